#!/usr/bin/env bash
# Import circles between the modules (files) of a crate, from cargo-modules'
# dependency graph: every item is counted as part of the module that defines
# it, and the strongly connected groups of the module graph are printed.
# Exits 1 when there is one.
#
#   scripts/module-circles.sh [PACKAGE] [DEPTH]
#
#   PACKAGE  a workspace package (default p2p-service-vm, the p2pd crate)
#   DEPTH    module path depth to compare at (default: whole paths, each
#            file its own module; 1: the crate's top-level modules only)
#
# Needs cargo-modules 0.27 (the last for rustc 1.95):
#   cargo install cargo-modules --version 0.27.0 --locked
# What it reads: `use` declarations and the types in items' signatures and
# fields. A call written out with a full path inside a function body, with
# no `use`, is not an edge of its graph.
set -euo pipefail
cd "$(dirname "$0")/.."
package="${1:-p2p-service-vm}"
depth="${2:-99}"
command -v cargo-modules >/dev/null || {
    echo "cargo-modules is not installed: cargo install cargo-modules --version 0.27.0 --locked" >&2
    exit 2
}
dot="$(mktemp -t module-graph.XXXXXX.dot)"
trap 'rm -f "$dot"' EXIT
cargo modules dependencies -p "$package" --lib --no-externs --no-sysroot >"$dot"
python3 - "$dot" "$depth" <<'PY'
import collections, re, sys

text = open(sys.argv[1]).read()
depth = int(sys.argv[2])
kinds = dict(re.findall(r'^\s*"([^"]+)" \[label="([^|"]+)\|', text, re.M))
modules = {n for n, k in kinds.items() if k == "crate" or k.endswith("mod")}


def module_of(item):
    while item not in modules:
        item = item.rsplit("::", 1)[0]
    return "::".join(item.split("::")[: depth + 1])


graph = collections.defaultdict(set)
for a, b in re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[label="uses"', text, re.M):
    if b in kinds and module_of(a) != module_of(b):
        graph[module_of(a)].add(module_of(b))

# Tarjan's strongly connected components, iteratively (deep module trees).
index, low, on_stack, stack, groups = {}, {}, set(), [], []
for root in sorted(set(graph) | {m for ms in graph.values() for m in ms}):
    if root in index:
        continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
        node, edges = work[-1]
        step = next(edges, None)
        if step is not None:
            if step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                on_stack.add(step)
                work.append((step, iter(sorted(graph[step]))))
            elif step in on_stack:
                low[node] = min(low[node], index[step])
            continue
        work.pop()
        if work:
            low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
            group = []
            while True:
                m = stack.pop()
                on_stack.discard(m)
                group.append(m)
                if m == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

names = {module_of(m) for m in modules}
edges = sum(len(v) for v in graph.values())
print(f"{len(names)} modules, {edges} imports between them, {len(groups)} circles")
for g in groups:
    members = set(g)
    print(f"circle of {len(g)}: {', '.join(g)}")
    for a in g:
        for b in sorted(graph[a] & members):
            print(f"    {a} -> {b}")
sys.exit(1 if groups else 0)
PY
