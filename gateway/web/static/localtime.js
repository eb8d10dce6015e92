// Token expiry in the reader's own time zone, beside the UTC the page states (without script: UTC only).
"use strict";
(function () {
  function local(date) {
    return isNaN(date.getTime()) ? "" : date.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "medium"});
  }
  document.querySelectorAll("time[data-local]").forEach(function (el) {
    var text = local(new Date(el.getAttribute("datetime")));
    if (text) { el.title = text + " your time"; el.insertAdjacentText("afterend", " (" + text + " your time)"); }
  });
  document.querySelectorAll("input[data-utc-local]").forEach(function (input) {
    var out = document.getElementById(input.dataset.utcLocal);
    if (!out) { return; }
    function show() {
      var v = input.value;  // YYYY-MM-DDTHH:MM[:SS], meant as UTC
      var text = v ? local(new Date(v.length === 16 ? v + ":00Z" : v + "Z")) : "";
      out.textContent = text ? "That is " + text + " your time." : "";
    }
    input.addEventListener("input", show);
    show();
  });
})();
