"""Prove a refactor of the C core moved no machine code (``make same-code``).

Builds ``native/engine.c`` of a git ref (BASE) and of the working tree with
the same compiler and flags (the working tree's ``compile_args()`` plus
Python's own CFLAGS and CCSHARED, as setuptools builds it) into a temporary
directory, disassembles the hot calls (``objdump -dr --no-show-raw-insn``)
and compares them with addresses and relocation-dependent offsets
normalised.  A function's compiler-made parts (``eng_open.cold``,
``.part.N``, ``.isra.N``, ...) belong to it.  Exit status 1 on a difference
(the diff is printed), 0 when every function is identical; the text size of
both objects is printed either way.

    python native/same_code.py BASE [FUNCTION ...]
"""

from __future__ import annotations

import difflib
import re
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from build_native import compile_args

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ["eng_transition", "eng_update_price", "eng_read_price", "eng_open"]


def build(src_dir: Path, obj: Path) -> None:
    """Compile src_dir/engine.c to obj with the flags of the real build."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "gcc")
    flags = shlex.split(sysconfig.get_config_var("CFLAGS") or "")
    flags += shlex.split(sysconfig.get_config_var("CCSHARED") or "")
    subprocess.run([*cc, *flags, *compile_args(), "-I", str(src_dir), "-c",
                    str(src_dir / "engine.c"), "-o", str(obj)], check=True)


def export_native(ref: str, dest: Path) -> None:
    """native/ of the git ref ref, into dest."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "native"],
                         check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
        else:   # Python without extraction filters: our own repository's tree
            t.extractall(dest)


HEADER = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
ADDRESS = re.compile(r"^\s*[0-9a-f]+:\s*")                        # "  1a4:\t"
TARGET = re.compile(r"\b[0-9a-f]+ <([^>+]+)(\+0x[0-9a-f]+)?>")    # "1a4 <f+0x1a4>"
SECTION_ADDEND = re.compile(r"(R_\w+\s+\.[\w.]+)[+-]0x[0-9a-f]+")  # ".rodata+0x40"


def normalise(line: str, own: str) -> str:
    """One disassembly line without its address; a jump inside the function
    keeps its offset, any other target only its symbol; relocations against
    a section lose the addend (where in .rodata/.bss a datum landed)."""
    line = re.sub(r"\s+#.*$", "", ADDRESS.sub("", line.rstrip()))   # "# 5e <f+0x5e>": rip

    def target(m: re.Match[str]) -> str:
        sym, off = m.group(1), m.group(2) or ""
        return f"<{sym}{off}>" if sym.split(".")[0] == own else f"<{sym}>"
    line = TARGET.sub(target, line)
    return SECTION_ADDEND.sub(r"\1+X", line)


def functions(obj: Path, names: list[str]) -> dict[str, list[str]]:
    """The normalised disassembly of each named function (and its parts)."""
    text = subprocess.run(["objdump", "-dr", "--no-show-raw-insn", str(obj)],
                          check=True, capture_output=True, text=True).stdout
    out: dict[str, list[str]] = {n: [] for n in names}
    cur: str | None = None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            base = m.group(1).split(".")[0]
            cur = base if base in out else None
            if cur:
                out[cur].append(f"<{m.group(1)}>:")
            continue
        if cur and line.strip():
            out[cur].append(normalise(line, cur))
    return out


def text_size(obj: Path) -> str:
    """The .text section's size and size(1)'s text (code + read-only data)."""
    sections = subprocess.run(["size", "-A", str(obj)], check=True, capture_output=True,
                              text=True).stdout
    dot_text = sum(int(f[1]) for f in (ln.split() for ln in sections.splitlines())
                   if len(f) >= 2 and f[0].startswith(".text") and f[1].isdigit())
    berkeley = subprocess.run(["size", str(obj)], check=True, capture_output=True,
                              text=True).stdout.splitlines()[1].split()[0]
    return f".text {dot_text} bytes, size(1) text {berkeley} bytes"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    base, names = argv[0], argv[1:] or FUNCTIONS
    with tempfile.TemporaryDirectory(prefix="same-code-") as tmp:
        t = Path(tmp)
        export_native(base, t / "base")
        build(t / "base" / "native", t / "base.o")
        build(ROOT / "native", t / "work.o")
        old, new = functions(t / "base.o", names), functions(t / "work.o", names)
        print(f"BASE {base}: {text_size(t / 'base.o')}")
        print(f"working tree: {text_size(t / 'work.o')}")
        differ = 0
        for n in names:
            if not old[n] or not new[n]:
                print(f"{n}: missing ({'BASE' if not old[n] else 'working tree'})")
                differ += 1
            elif old[n] == new[n]:
                print(f"{n}: identical ({len(new[n]) - 1} lines)")
            else:
                differ += 1
                diff = list(difflib.unified_diff(old[n], new[n], "BASE", "working tree",
                                                 lineterm="", n=1))
                changed = sum(1 for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---"))
                print(f"{n}: DIFFERS ({len(old[n]) - 1} -> {len(new[n]) - 1} lines, "
                      f"{changed} changed lines)")
                print("\n".join(diff))
        print("same code" if differ == 0 else f"{differ} function(s) differ")
        return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
