// The page's only script: the Copy button beside a token shown once. Without it, select and copy by hand.
"use strict";
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  var field = document.getElementById(button.dataset.copy);
  var status = document.getElementById(button.dataset.copy + "-status");
  if (!field) { return; }
  button.hidden = false;
  function report(ok) {
    if (status) { status.textContent = ok ? "Copied to the clipboard." : "Copy failed: select the token and copy it."; }
  }
  function fallback() {
    field.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    report(ok);
  }
  button.addEventListener("click", function () {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(function () { report(true); }, fallback);
    } else {
      fallback();
    }
  });
});
