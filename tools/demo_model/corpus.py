"""The demo models' corpus: the Python standard library sources of the running interpreter.

Everything here is deterministic: the file list is sorted, the split of a file depends only on a
hash of its relative path, and the chat examples are derived from the train files with `ast`.
The manifest (relative path, split, content hash) records exactly which files were used, so a
rebuild on another interpreter can say how its corpus differs.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [EOS, SYSTEM, USER, ASSISTANT, END]  # ids 0..4, in this order

# Folders that hold no hand-written Python worth learning from (codec tables, generated data,
# third-party packages, build artifacts).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "lib-dynload", "encodings", "pydoc_data", "__pycache__"}
_MAX_FILE_BYTES = 320_000  # larger files are data tables, not code
# Split by a hash of the relative path, in parts per thousand: stable under file additions.
_TEST_PERMILLE = 50
_VALID_PERMILLE = 30
# Chat examples: a documented function's docstring summary as the question, its source as the answer.
_CHAT_MIN_CHARS, _CHAT_MAX_CHARS, _CHAT_MAX_PROMPT = 120, 1600, 300


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # posix path relative to the stdlib folder
    split: str  # "train" | "valid" | "test"
    sha256: str  # of the file's bytes
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    h = int.from_bytes(hashlib.blake2b(relpath.encode(), digest_size=8).digest(), "little") % 1000
    if h < _TEST_PERMILLE:
        return "test"
    if h < _TEST_PERMILLE + _VALID_PERMILLE:
        return "valid"
    return "train"


def _candidate_paths(root: Path) -> list[str]:
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        parts = rel.parts
        if any(d in _EXCLUDED_DIRS for d in parts[:-1]) or parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def _readable_source(data: bytes) -> str | None:
    """The file as text if it is UTF-8 Python that parses and holds no special-token string."""
    if len(data) > _MAX_FILE_BYTES:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n")
    if any(tok in text for tok in SPECIAL_TOKENS) or "\x00" in text:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            return None
    return text


def collect(root: Path | None = None) -> list[SourceFile]:
    root = root or stdlib_dir()
    files = []
    for rel in _candidate_paths(root):
        data = (root / rel).read_bytes()
        text = _readable_source(data)
        if text is not None and text.strip():  # empty __init__.py files teach nothing
            files.append(SourceFile(rel, split_of(rel), hashlib.sha256(data).hexdigest(), text))
    return files


def manifest_lines(files: list[SourceFile]) -> list[str]:
    head = f"# python {sys.version.split()[0]}; relpath<TAB>split<TAB>sha256[:16]<TAB>bytes"
    rows = [f"{f.relpath}\t{f.split}\t{f.sha256[:16]}\t{len(f.text.encode())}" for f in files]
    return [head, *rows]


def compare_manifest(files: list[SourceFile], manifest: list[str]) -> list[str]:
    """Differences between this interpreter's corpus and a recorded manifest (empty: identical)."""
    recorded = {}
    for line in manifest:
        if line and not line.startswith("#"):
            rel, split, digest, _ = line.split("\t")
            recorded[rel] = (split, digest)
    mine = {f.relpath: (f.split, f.sha256[:16]) for f in files}
    diffs = [f"missing here: {r}" for r in sorted(recorded.keys() - mine.keys())]
    diffs += [f"extra here: {r}" for r in sorted(mine.keys() - recorded.keys())]
    both = sorted(recorded.keys() & mine.keys())
    diffs += [f"content differs: {r}" for r in both if recorded[r] != mine[r]]
    return diffs


def document(text: str) -> str:
    """A file as one training document: the separator token starts it (it doubles as BOS)."""
    return EOS + text


def chat_turns(messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The text the chat template renders (kept in step with tokenizer.CHAT_TEMPLATE)."""
    role_token = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    out = EOS + "".join(f"{role_token[r]}\n{c}{END}\n" for r, c in messages)
    return out + (ASSISTANT + "\n" if add_generation_prompt else "")


def _summary(doc: str) -> str | None:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(line.strip() for line in para.splitlines()).strip()
    if len(para) < 12 or len(para) > _CHAT_MAX_PROMPT:
        return None
    return para


def chat_examples(text: str) -> list[str]:
    """One chat document per documented function of a module: docstring summary -> source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(text)
    lines = text.splitlines(keepends=True)  # once: ast.get_source_segment re-splits on every call
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        # Whole lines from `def` to the body's end (decorators left out); dedented below.
        src = "".join(lines[node.lineno - 1 : node.end_lineno])
        if not doc or not (_CHAT_MIN_CHARS <= len(src) <= _CHAT_MAX_CHARS):
            continue
        prompt = _summary(doc)
        if prompt is None:
            continue
        code = textwrap.dedent(src).strip("\n")
        out.append(chat_turns([("user", prompt), ("assistant", code)], add_generation_prompt=False))
    return out


def documents(files: list[SourceFile], split: str, with_chat: bool) -> list[str]:
    docs = [document(f.text) for f in files if f.split == split]
    if with_chat:
        for f in files:
            if f.split == split:
                docs.extend(chat_examples(f.text))
    return docs
