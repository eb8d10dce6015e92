"""Differential check of gateway.lbac.traceql against Tempo's own lexer and parser (opt-in, not a test).

    python -m tests.tempo_lexer_diff TEMPO_SRC [SEED] [N]

``TEMPO_SRC`` is a checkout of grafana/tempo with its ``vendor`` directory (``git archive HEAD go.mod go.sum pkg
vendor``); ``go`` must be on PATH. The script adds one file to its ``pkg/traceql`` (a dump of the lexer's
structural tokens) and a small command, builds it offline (``-mod=vendor``, ``GOPROXY=off``) and feeds it
Tempo's ``test_examples.yaml``, mutations of it and ``N`` random strings of tricky pieces (quotes of every kind,
comments, braces, scopes, control and Unicode spaces). It reports a mismatch when, for a query both lexers
read, the sequence of ``{ } ( ) |`` differs; when Tempo parses a query the gateway rewrote but not the
rewrite; or when a filter of the parsed rewrite lacks the condition. 2026-12-05/06, Tempo ``ad33aa8f``, seeds 1
to 4, ~130,000 inputs: no mismatch; every refusal of a query Tempo parses was one of the deliberate ones
(``parent.``, ``rootServiceName``, ``trace:rootService``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter

import yaml

from gateway.lbac import RewriteError
from gateway.lbac.traceql import LBRACE, LPAREN, PIPE, RBRACE, RPAREN, restrict, tokenize

CONDITION = '(resource.env = "dev")'
_DUMP_GO = '''package traceql

import (
\t"strings"
\t"text/scanner"
)

// DumpStructure lexes s with Tempo's lexer: the structural tokens in order, or "ERR:" and the first error.
func DumpStructure(s string) string {
\tl := lexer{parser: yyNewParser().(*yyParserImpl)}
\tl.Init(strings.NewReader(s))
\tl.Scanner.Error = func(_ *scanner.Scanner, msg string) { l.Error(msg) }
\tvar sb strings.Builder
\tvar lval yySymType
\tnames := map[int]string{OPEN_BRACE: "{", CLOSE_BRACE: "}", OPEN_PARENS: "(", CLOSE_PARENS: ")", PIPE: "|"}
\tfor i := 0; i < 1000000; i++ {
\t\ttok := l.Lex(&lval)
\t\tif tok == 0 {
\t\t\tbreak
\t\t}
\t\tsb.WriteString(names[tok])
\t}
\tif len(l.errs) > 0 {
\t\treturn "ERR:" + l.errs[0].Error()
\t}
\treturn sb.String()
}
'''
_MAIN_GO = '''package main

import (
\t"bufio"
\t"encoding/json"
\t"os"

\t"github.com/grafana/tempo/pkg/traceql"
)

func main() {
\tsc := bufio.NewScanner(os.Stdin)
\tsc.Buffer(make([]byte, 1<<20), 1<<24)
\tenc := json.NewEncoder(os.Stdout)
\tfor sc.Scan() {
\t\tvar x struct{ Q string }
\t\tif err := json.Unmarshal(sc.Bytes(), &x); err != nil {
\t\t\tpanic(err)
\t\t}
\t\to := map[string]string{"structure": traceql.DumpStructure(x.Q), "parse_err": "", "string": ""}
\t\tif e, err := traceql.ParseNoOptimizations(x.Q); err != nil {
\t\t\to["parse_err"] = err.Error()
\t\t} else {
\t\t\to["string"] = e.String()
\t\t}
\t\t_ = enc.Encode(o)
\t}
}
'''
_PIECES = ["{", "}", "(", ")", "|", "||", '"', "'", "`", "//", "/*", "*/", "\n", ".", "resource.", "parent.", "span.",
           "a", "1", "1s", " ", "\\", '"}"', "&&", "=", "!", "~", ">", "<", "&", "span:", "\t", ",", "µ", "\xa0", ":",
           ".a", '"x"', "count()", "rate()", "by(.a)", "select(.b)", " > 1", "event.", "{ .a = 1 }", "{}", "-", "*",
           "trace:", "rootName", "\x0b", "\r", "\u2028", ".5", "1.", "0x1", "e", "_", '"\\""', "`}`", '."}"']


def _structure(q: str) -> str:
    try:
        return "".join(t.kind for t in tokenize(q) if t.kind in (LBRACE, RBRACE, LPAREN, RPAREN, PIPE))
    except RewriteError as exc:
        return f"ERR:{exc}"


def _build(src: str) -> str:
    with open(os.path.join(src, "pkg", "traceql", "zz_gateway_dump.go"), "w", encoding="utf-8") as f:
        f.write(_DUMP_GO)
    os.makedirs(os.path.join(src, "cmd", "gateway-tqcheck"), exist_ok=True)
    with open(os.path.join(src, "cmd", "gateway-tqcheck", "main.go"), "w", encoding="utf-8") as f:
        f.write(_MAIN_GO)
    out = os.path.join(tempfile.mkdtemp(), "tqcheck")
    env = {**os.environ, "GOFLAGS": "-mod=vendor", "GOPROXY": "off", "GOTOOLCHAIN": "local"}
    subprocess.run(["go", "build", "-o", out, "./cmd/gateway-tqcheck"], cwd=src, env=env, check=True)
    return out


def _tempo(binary: str, qs: list[str]) -> list[dict[str, str]]:
    data = "".join(json.dumps({"Q": q}) + "\n" for q in qs).encode()
    out = subprocess.run([binary], input=data, capture_output=True, check=True).stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def main(src: str, seed: int = 1, n: int = 20000) -> int:
    binary = _build(src)
    with open(os.path.join(src, "pkg", "traceql", "test_examples.yaml"), encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    corpus = [q for sec in ("valid", "parse_fails", "validate_fails", "unsupported") for q in doc.get(sec) or []]
    rnd = random.Random(seed)
    qs = corpus + ["".join(rnd.choice(_PIECES) for _ in range(rnd.randint(1, 14))) for _ in range(n)]
    for q in corpus:
        for _ in range(20):
            i = rnd.randint(0, len(q))
            qs.append(q[:i] + rnd.choice(_PIECES) + q[i:])
    bad, refused, originals, rewrites = 0, Counter[str](), [], []
    for q, r in zip(qs, _tempo(binary, qs), strict=True):
        mine = _structure(q)
        if not r["structure"].startswith("ERR") and not mine.startswith("ERR") and r["structure"] != mine:
            bad += 1
            print("structure differs:", repr(q), r["structure"], mine)
        if r["parse_err"]:
            continue
        try:
            rewrites.append(restrict(q, CONDITION))
            originals.append(q)
        except RewriteError as exc:
            refused[str(exc)] += 1
    for q, out, r in zip(originals, rewrites, _tempo(binary, rewrites), strict=True):
        filters = r["structure"].count("{")
        if r["parse_err"] or r["structure"] != _structure(out) or \
                r["string"].count("resource.env = `dev`") + r["string"].count('resource.env = "dev"') < filters:
            bad += 1
            print("rewrite wrong:", repr(q), repr(out), r["parse_err"] or r["string"])
    print(f"{len(qs)} queries, {len(originals) + sum(refused.values())} parsed by Tempo: {len(originals)} rewritten "
          f"(Tempo parses each, condition in every filter), {sum(refused.values())} refused; mismatches: {bad}")
    for reason, k in refused.most_common():
        print(f"  {k} refused: {reason}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], *(int(a) for a in sys.argv[2:4])))
