"""Reading training text: plain files, directories of them, and JSONL (a text field, or chat
messages rendered with the tokenizer's chat template, optionally with the loss on the
assistant's turns only). Bad input is a DataError naming the file (and line) at fault;
nothing is silently skipped."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import DataError
from ..files import jsonl_records, read_text

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".cor", ".py", ".rs", ".html", ".htm", ".tex", ""}

LOSS_ON = ("all", "assistant")


@dataclass(frozen=True)
class SourceSpec:
    path: str
    licence: str = "unspecified"
    field: str = "text"  # JSONL: the text field; "messages" renders a chat with the template
    description: str = ""
    pattern: str = "**/*"  # which files of a directory to read
    # "assistant": only the assistant's turns of a chat are trained on; the system prompt and
    # the user's request are context (predicting them teaches nothing the denoiser will decode)
    loss_on: str = "all"

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON:
            raise DataError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.loss_on == "assistant" and self.field != "messages":
            raise DataError("loss on the assistant's turns needs chat messages (field 'messages')")


@dataclass(frozen=True)
class Document:
    text: str
    # character spans [start, end) whose tokens carry the loss; None: all of the text
    trained: tuple[tuple[int, int], ...] | None = None


class _VisibleText(HTMLParser):
    """Text of an HTML page without scripts, styles and navigation; only its <main> element
    when it has one (documentation sites put menus and help text around it). Paragraphs are
    separated by blank lines; line breaks inside them are the page source's wrapping and
    become spaces, except in <pre> code."""

    SKIP = {"script", "style", "nav", "head", "noscript"}
    BLOCKS = {"p", "div", "br", "li", "pre", "tr", "section", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.main_parts: list[str] = []
        self.skip = self.main = self.pre = 0

    def handle_starttag(self, tag, attrs) -> None:
        self.skip += tag in self.SKIP
        self.main += tag == "main"
        self.pre += tag == "pre"
        if tag in self.BLOCKS:
            self._emit("\n\n")

    def handle_endtag(self, tag) -> None:
        if tag in self.BLOCKS:
            self._emit("\n\n")
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "main" and self.main:
            self.main -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1

    def handle_data(self, data) -> None:
        self._emit(data if self.pre else " ".join(data.split("\n")))

    def _emit(self, text: str) -> None:
        if not self.skip:
            (self.main_parts if self.main else self.parts).append(text)


def html_to_text(html: str) -> str:
    parser = _VisibleText()
    parser.feed(html)
    text = "".join(parser.main_parts or parser.parts)
    paragraphs = (p.strip("\n") for p in text.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p.strip())


def assistant_spans(messages: list[dict], tokenizer, rendered: str, where: str) -> tuple[tuple[int, int], ...]:
    """Where each assistant turn sits in ``rendered`` (the whole chat through the template):
    from the end of the conversation before it plus the generation prompt, to the end of the
    conversation including it (so the turn's end-of-turn tokens are trained on too)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and rendered.startswith(through)):
            raise DataError(f"{where}: the chat template does not render turn by turn, so the assistant's "
                            f"turns cannot be located; use loss on all tokens")
        spans.append((len(before), len(through)))
    if not spans:
        raise DataError(f"{where}: no assistant turn to train on")
    return tuple(spans)


def _jsonl_documents(path: Path, spec: SourceSpec, tokenizer) -> Iterator[Document]:
    field = spec.field
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number}: no field {field!r} (found {keys})")
        value = record[field]
        trained = None
        if field == "messages":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{path}: chat messages need a tokenizer with a chat template")
            if not isinstance(value, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
                raise DataError(f"{path}:{number}: 'messages' must be a list of {{role, content}} objects")
            messages = value
            value = tokenizer.apply_chat_template(messages, tokenize=False)
            if spec.loss_on == "assistant":
                trained = assistant_spans(messages, tokenizer, value, f"{path}:{number}")
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {field!r} is {type(value).__name__}, not text")
        if value.strip():
            yield Document(value, trained)


def read_documents(spec: SourceSpec, tokenizer=None) -> Iterator[Document]:
    """Every document of a source: one per text file, one per JSONL record."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.glob(spec.pattern) if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise DataError(f"{path}: no text or JSONL files inside")
    else:
        files = [path]
    for f in files:
        if f.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(f, spec, tokenizer)
        elif f.suffix.lower() in (".html", ".htm"):
            text = html_to_text(read_text(f))
            if text.strip():
                yield Document(text)
        else:
            yield Document(read_text(f))
