#!/usr/bin/env python3
"""Checks that the top-level modules of a Rust library crate import each
other without cycles, and prints the dependency graph.

    python3 scripts/module-cycles.py [--known A,B,...]... [CRATE_SRC_DIR ...]
    python3 scripts/module-cycles.py --self-test

CRATE_SRC_DIR defaults to crates/reach/src.

A top-level module is a file `src/NAME.rs` or a folder `src/NAME/`; one of
them depends on another when its code (tests left out) names
`crate::OTHER`, or `super::OTHER` from a top-level file. The crate root
(`lib.rs`) only declares and re-exports, so it is not a node. Exits 1 and
names the modules of each cycle when there is one.

`--known A,B,C` names a cycle that is known and being taken apart (step 7):
it is reported but tolerated while it stays exactly that set. A cycle that
grows, a new one, or a known one that shrank or went all fail, so the list
here and in scripts/test.sh only ever gets shorter.
"""
import re
import sys
from pathlib import Path

TEST_MODULE = re.compile(r"^\s*#\[cfg\(test\)\]\s*\n\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*(;|\{)", re.M)
CRATE_PATH = re.compile(r"\bcrate::(\{[^;]*?\}|\w+)", re.S)
SUPER_PATH = re.compile(r"\bsuper::(\{[^;]*?\}|\w+)", re.S)
LINE_COMMENT = re.compile(r"//[^\n]*")


def strip(code: str) -> str:
    """Code without comments and without inline test modules."""
    code = LINE_COMMENT.sub("", code)
    m = TEST_MODULE.search(code)
    return code[: m.start()] if m else code


def first_names(group: str) -> list[str]:
    """`name` or the first segment of each item of `{a, b::c, d::{e}}`."""
    if not group.startswith("{"):
        return [group]
    inner, depth, items, cur = group[1:-1], 0, [], ""
    for ch in inner:
        if ch in "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [re.split(r"\W", i.strip(), maxsplit=1)[0] for i in items if i.strip()]


def modules(src: Path) -> dict[str, list[Path]]:
    mods = {}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix == ".rs" and p.stem not in ("lib", "main"):
            mods.setdefault(p.stem, []).append(p)
        elif p.is_dir():
            mods.setdefault(p.name, []).extend(sorted(p.rglob("*.rs")))
    return mods


def graph(src: Path) -> dict[str, set[str]]:
    mods = modules(src)
    deps = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            code = strip(f.read_text())
            names = [n for g in CRATE_PATH.findall(code) for n in first_names(g)]
            if f.parent == src:  # super:: of a top-level file is the crate root
                names += [n for g in SUPER_PATH.findall(code) for n in first_names(g)]
            deps[m].update(n for n in names if n in mods and n != m)
    return deps


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(deps[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def check(srcs: list[Path], known: list[frozenset]) -> bool:
    ok = True
    found = []
    for src in srcs:
        deps = graph(src)
        print(f"{src}: {len(deps)} top-level modules")
        for m in sorted(deps):
            print(f"  {m} -> {', '.join(sorted(deps[m])) or '(nothing)'}")
        found += [frozenset(c) for c in cycles(deps)]
    for comp in found:
        names = ", ".join(sorted(comp))
        if comp in known:
            print(f"known import cycle (being taken apart): {names}")
        else:
            ok = False
            print(f"error: import cycle among {names}", file=sys.stderr)
    for comp in known:
        if comp not in found:
            ok = False
            print(f"error: the known cycle {', '.join(sorted(comp))} is gone or changed: "
                  "update --known (in scripts/test.sh) to what remains", file=sys.stderr)
    if not ok:
        print("error: break each cycle: move what both sides need into a module that imports neither",
              file=sys.stderr)
    elif not found:
        print("no import cycles")
    return ok


def self_test() -> bool:
    """The checker finds a cycle it is shown, and passes once it is broken."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = Path(d)
        (src / "lib.rs").write_text("mod a; mod b; mod c;\n")
        (src / "a.rs").write_text("use crate::b::B;\n// crate::c in a comment is no import\n")
        (src / "b").mkdir()
        (src / "b" / "mod.rs").write_text("use crate::{c::C, a};\n#[cfg(test)]\nmod tests { use crate::c; }\n")
        (src / "c.rs").write_text("use super::a::A;\n")
        deps = graph(src)
        assert deps == {"a": {"b"}, "b": {"a", "c"}, "c": {"a"}}, deps
        assert cycles(deps) == [["a", "b", "c"]], cycles(deps)
        (src / "c.rs").write_text("pub struct C;\n")
        assert cycles(graph(src)) == [["a", "b"]]
        (src / "a.rs").write_text("pub struct A;\n")
        assert cycles(graph(src)) == []
    print("self-test passed")
    return True


def main() -> int:
    args = sys.argv[1:]
    if args == ["--self-test"]:
        return 0 if self_test() else 1
    known, srcs = [], []
    while args:
        a = args.pop(0)
        if a == "--known" and args:
            known.append(frozenset(args.pop(0).split(",")))
        else:
            srcs.append(Path(a))
    srcs = srcs or [Path(__file__).resolve().parent.parent / "crates/reach/src"]
    return 0 if check(srcs, known) else 1


if __name__ == "__main__":
    sys.exit(main())
