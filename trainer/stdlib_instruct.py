"""An instruction dataset present on every machine: questions about the Python standard library's
own functions, answered from its source (signature and the first line of the docstring).

Read with `ast` from the .py files, never imported (no module's import side effects), in a fixed
order: the same records on every machine with the same Python. The validation split is the
functions whose qualified name hashes (CRC-32) to 0 mod 20 (~5%), so a record never changes side
as the standard library grows. Pure Python, no torch: the launcher may count it.

    python -m trainer.stdlib_instruct OUT_DIR     # writes {train,validation}.{alpaca,messages}.jsonl
"""

from __future__ import annotations

import ast
import functools
import json
import os
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Any

# Pure-Python modules with well-documented public functions.
MODULES = (
    "argparse", "base64", "bisect", "calendar", "colorsys", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "imghdr", "inspect", "ipaddress",
    "json", "keyword", "linecache", "locale", "logging", "mimetypes", "ntpath", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "posixpath", "pprint", "queue",
    "quopri", "random", "reprlib", "secrets", "shlex", "shutil", "smtplib", "socket", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "types", "typing", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "zipfile", "zipimport",
)
VALIDATION_MOD = 20

# Three kinds of question, picked per function by a hash of its name (fixed, spread evenly).
KINDS = (
    ("Write the signature of {name} and say what it does.", "{signature}\n{doc}"),
    ("What does {name} do?", "{doc}"),
    ("Which function of the {module} module does this: {doc_lower}", "{name}{args}"),
)


def _module_file(module: str) -> Path | None:
    root = Path(sysconfig.get_paths()["stdlib"])
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _first_line(doc: str) -> str:
    """The docstring's first sentence-line: its first non-empty line, stripped."""
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _functions(module: str, tree: ast.Module) -> list[tuple[str, str, str]]:
    """(qualified name, argument list, first docstring line) of the module's public top-level
    functions and the public methods of its public classes, in source order."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                doc = _first_line(ast.get_docstring(child) or "")
                if len(doc) >= 12 and not doc.startswith(("Deprecated", "Internal", "XXX")):
                    found.append((f"{prefix}{child.name}", ast.unparse(child.args), doc))
            elif isinstance(child, ast.ClassDef) and not child.name.startswith("_") and not prefix:
                visit(child, f"{module}.{child.name}.")

    visit(tree, f"{module}.")
    return found


@functools.lru_cache(maxsize=1)
def _all_records() -> tuple[tuple[str, dict[str, str]], ...]:
    out = []
    for module in MODULES:
        path = _module_file(module)
        if path is None:  # removed in a later Python (imghdr in 3.13): fewer records, same others
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, args, doc in _functions(module, tree):
            args = f"({args.replace('self, ', '').replace('self', '').replace('cls, ', '')})"
            h = zlib.crc32(name.encode())
            instruction, output = KINDS[(h >> 8) % len(KINDS)]
            fields = {"name": name, "module": module, "args": args, "signature": f"{name}{args}", "doc": doc, "doc_lower": doc[0].lower() + doc[1:]}
            split = "validation" if h % VALIDATION_MOD == 0 else "train"
            out.append((split, {"instruction": instruction.format(**fields), "input": "", "output": output.format(**fields)}))
    return tuple(out)


def records(split: str = "train") -> list[dict[str, str]]:
    """Alpaca-style records {instruction, input, output} of one split ("train" or "validation")."""
    if split not in ("train", "validation"):
        raise ValueError(f"stdlib_instruct: split must be train or validation, got {split!r}")
    return [dict(r) for s, r in _all_records() if s == split]


def as_messages(record: dict[str, str]) -> dict[str, Any]:
    """The chat variant of a record: one user turn, one assistant turn."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}


def write_jsonl(out_dir: str | os.PathLike) -> dict[str, Path]:
    """{split}.alpaca.jsonl and {split}.messages.jsonl for both splits; written to a temporary
    name and renamed, so a reader never sees half a file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in ("train", "validation"):
        recs = records(split)
        for kind, rows in (("alpaca", recs), ("messages", [as_messages(r) for r in recs])):
            path = out / f"{split}.{kind}.jsonl"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)
            written[f"{split}.{kind}"] = path
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.stdlib_instruct OUT_DIR")
    for name, path in write_jsonl(sys.argv[1]).items():
        print(f"{name}: {sum(1 for _ in open(path))} records -> {path}")
