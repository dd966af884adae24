"""Jinja2 over templates/: the subject, HTML and plain-text parts of an email."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from html import escape
from html.parser import HTMLParser
from itertools import chain
from urllib.parse import urlsplit

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    TemplateRuntimeError,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from notifier.errors import PermanentDeliveryError, TransientDeliveryError

TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,99}$")
# The variable the layouts show the unsubscribe link from. notifier sets it when it sends (a link of
# its own signing, or none for transactional mail), never the caller's data: a caller's would have put
# a link no unsubscribe honours into mail that cannot be unsubscribed from.
UNSUBSCRIBE_URL = "unsubscribe_url"
# The block of a template that holds its own words, inside the layout (templates/email/_layout.*).
CONTENT_BLOCK = "content"
# What a rendered email may hold, as a literal send's (notifier.schemas takes these): a subject of one
# SMTP line, a part of a million characters. A template's loop over large data could otherwise make an
# email of any size, built whole in the API at every request and in the worker at every attempt (a
# nested loop made 100 MB in 3 s), for a server to refuse.
MAX_SUBJECT_CHARS = 998
MAX_PART_CHARS = 1_000_000
# A number of more bits than this (about 40,000 digits) is no template's business.
MAX_POWER_BITS = 2**17
# Schemes whose link runs something when clicked instead of opening a page.
_ACTIVE_SCHEMES = frozenset({"javascript", "vbscript", "data"})


def link(value) -> str:
    """The `link` filter: a caller's value as the target of a link, refused (a TemplateError, so a 422
    at request time) when it would run script rather than open a page, or names no scheme. Its scheme
    is read as a browser reads it: urlsplit drops the blanks, tabs and line breaks that "java\tscript:"
    hides behind."""
    url = str(value)
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # an unbalanced "[" in the host: no browser opens it either
        raise TemplateRuntimeError("a link in the data is not a URL") from exc
    if scheme in _ACTIVE_SCHEMES:
        raise TemplateRuntimeError(f"a link in the data is a {scheme}: URL; a link must open a page, not run script")
    if not scheme:
        # An email has no address of its own for a relative link ("/orders/1", "//host/x") to start
        # from: each reader makes something else of it, or nothing.
        raise TemplateRuntimeError("a link in the data has no scheme; give the whole URL, https://...")
    return url


class TemplateRenderError(PermanentDeliveryError):
    """The template is broken, or lacks a variable: sending again will not help."""


class TemplateMissing(TransientDeliveryError):
    """The template, or a file it uses, is not here, though the API rendered it when it accepted the
    send: a deploy under way (a worker of the release before the template's). Tried again at
    RETRY_INTERVALS, an ERROR each time, then the dead-letter queue. As a permanent failure it made
    a dead letter of every send of a new template that a worker of the release before took."""


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str | None
    html: str | None


class _BoundedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, with `*` and `**` held to what an email can hold: `"x" * n` made a string of
    any size before the bound on output saw it (a gigabyte in the API at each request), and
    `10 ** (10 ** 8)` took minutes of a process's CPU."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) \
                        and len(seq) * times > 2 * MAX_PART_CHARS:
                    raise TemplateRuntimeError(f"a repetition of over {2 * MAX_PART_CHARS:,} items")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left).bit_length() * right > MAX_POWER_BITS:
            raise TemplateRuntimeError(f"a power of over {MAX_POWER_BITS:,} bits")
        return super().call_binop(context, operator, left, right)


class Renderer:
    """Renders the templates under one directory; caches compiled templates."""

    def __init__(self, templates_dir: str, brand_name: str = "notifier"):
        self.root = os.path.abspath(templates_dir)
        # Sandboxed: template variables are the caller's values and never get to reach Python objects.
        self.env = _BoundedEnvironment(
            loader=FileSystemLoader(self.root),
            undefined=StrictUndefined,
            autoescape=select_autoescape(["html"], default_for_string=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )
        self.env.globals["brand_name"] = brand_name
        # {{ refuse("...") }}: a template says what its data lack, in the caller's terms (an undefined
        # name made up for the purpose was what the 422 named).
        self.env.globals["refuse"] = _refuse
        self.env.filters["link"] = link

    def _path(self, name: str, part: str) -> str:
        return os.path.join(self.root, "email", f"{name}.{part}")

    def exists(self, name: str) -> bool:
        """Whether name is a template we can send: a subject and at least one body part."""
        if not TEMPLATE_NAME.match(name or ""):
            return False
        has_body = os.path.isfile(self._path(name, "txt")) or os.path.isfile(self._path(name, "html"))
        return has_body and os.path.isfile(self._path(name, "subject.txt"))

    def lacking(self, name: str) -> str:
        """Why name, which exists() refuses, is no template: what an operator adding one got wrong
        ("" when nothing of it is there)."""
        if not TEMPLATE_NAME.match(name or ""):
            return "a template's name is lower-case letters, digits and _ (at most 100), not starting with _"
        if not os.path.isfile(self._path(name, "subject.txt")):
            present = any(os.path.isfile(self._path(name, part)) for part in ("txt", "html"))
            return f"email/{name}.subject.txt is missing" if present else ""
        return f"email/{name}.txt and email/{name}.html are both missing"

    def names(self) -> list[str]:
        """Every sendable template, sorted."""
        folder = os.path.join(self.root, "email")
        found = {f.split(".", 1)[0] for f in os.listdir(folder)} if os.path.isdir(folder) else set()
        return sorted(name for name in found if self.exists(name))

    def render(self, name: str, data: dict | None, unsubscribe_url: str | None = None) -> RenderedEmail:
        """Render the three parts of template name with the caller's data and notifier's own
        unsubscribe link (None: none shown, whatever the data hold). TemplateRenderError if that
        cannot be done; TemplateMissing if it, or a file it uses, is not there."""
        if not self.exists(name):
            raise TemplateMissing(f"unknown template {name!r}", operator=True)
        context = {**(data or {}), UNSUBSCRIBE_URL: unsubscribe_url}
        try:
            subject = self._render_part(name, "subject.txt", context)
            text = self._render_part(name, "txt", context)
            html = self._render_part(name, "html", context)
        except TemplateNotFound as exc:
            # A file it extends, includes or imports (or a part of its own) gone since it was found: a
            # deploy under way, as when the template itself is missing.
            raise TemplateMissing(f"template {name!r}: {exc.name} is missing", operator=True) from exc
        except TemplateError as exc:
            raise TemplateRenderError(f"template {name!r}: {exc.message or exc}") from exc
        except UnicodeDecodeError as exc:
            raise TemplateRenderError(f"template {name!r}: a file of it (or one it extends, includes or imports) "
                                      f"is not UTF-8: {exc.reason} at byte {exc.start}") from exc
        except RecursionError as exc:
            raise TemplateRenderError(f"template {name!r} recurses without end (an include or a macro that calls "
                                      "itself)") from exc
        except ArithmeticError as exc:
            # A division by zero, or a range() over the sandbox's MAX_RANGE: the same on every attempt,
            # not a 500 at request time and a retry at send time.
            raise TemplateRenderError(f"template {name!r}: {type(exc).__name__}: {exc}") from exc
        except (TypeError, ValueError, LookupError, AttributeError) as exc:
            # Data of the wrong shape (a number where the template loops over a list) fails inside filters.
            raise TemplateRenderError(f"template {name!r}: the data do not fit: {exc}") from exc
        subject = " ".join((subject or "").split())
        if not subject:
            raise TemplateRenderError(f"template {name!r} rendered an empty subject")
        for part, rendered, limit in (("subject", subject, MAX_SUBJECT_CHARS), ("text", text, MAX_PART_CHARS),
                                      ("html", html, MAX_PART_CHARS)):
            size = len(rendered.rstrip("\n")) if rendered is not None else 0
            if size > limit:
                raise TemplateRenderError(f"template {name!r}: its {part} is {size:,} characters, over {limit:,}")
        if text is None and html is not None:
            text = html_to_text(html)
        if unsubscribe_url is not None:
            # A template of its own shape (no layout, or a layout without the link) shows the link as a
            # literal send does: the header alone is no visible way out.
            if text is not None and unsubscribe_url not in text:
                text = _with_text_footer(text, unsubscribe_url)
            if html is not None and unsubscribe_url not in html and escape(unsubscribe_url, quote=True) not in html:
                html = _with_footer(html, unsubscribe_url)
        return RenderedEmail(subject=subject, text=text, html=html)

    def summary(self, name: str, data: dict | None) -> tuple[str, str]:
        """Template name's subject and the words of its body without the layout around them (the
        footer, the unsubscribe line): what a digest shows of one of its items, among others that
        would each repeat them. TemplateRenderError as render()."""
        whole = self.render(name, data)  # refuses what a send of it would refuse, and is the fallback
        context = {**(data or {}), UNSUBSCRIBE_URL: None}
        for part in ("txt", "html"):
            if not os.path.isfile(self._path(name, part)):
                continue
            template = self.env.get_template(f"email/{name}.{part}")
            content = template.blocks.get(CONTENT_BLOCK)
            if content is None:  # a template of its own shape, no layout around it
                break
            try:
                body = self.env.concat(content(template.new_context(context)))
            except (TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError):
                # A block that needs what only the whole template sets up (a top-level {% set %},
                # super()): the whole text, as before, rather than nothing.
                break
            text = body.strip() + "\n" if part == "txt" else html_to_text(body)
            return whole.subject, text
        return whole.subject, whole.text or ""

    def _render_part(self, name: str, part: str, context: dict) -> str | None:
        if not os.path.isfile(self._path(name, part)):
            return None
        # A piece at a time, so a template far past the bound (twice it: blanks around it are dropped)
        # stops where it is rather than finishing first.
        bound = MAX_SUBJECT_CHARS if part == "subject.txt" else MAX_PART_CHARS
        limit = 2 * bound
        pieces, size = [], 0
        for piece in self.env.get_template(f"email/{name}.{part}").generate(context):
            size += len(piece)
            if size > limit:
                # Said as render() says a part past its bound: the bound it is held to, then where it stopped.
                shown = {"subject.txt": "subject", "txt": "text"}.get(part, part)
                raise TemplateRuntimeError(f"its {shown} is over {bound:,} characters (stopped at {limit:,})")
            pieces.append(piece)
        return "".join(pieces).strip() + "\n"


def _refuse(message: str):
    raise TemplateRuntimeError(message)


def literal(subject: str, text: str | None, html: str | None, unsubscribe_url: str | None = None) -> RenderedEmail:
    """An email whose parts the caller wrote; sent as given, never treated as a template, but for
    notifier's unsubscribe link at the end of each part when there is one (mail a user can
    unsubscribe from), as the templates' footer shows it: the List-Unsubscribe header alone is not
    the visible way out that the law asks of marketing mail in many places."""
    if text is None and html is not None:
        text = html_to_text(html)
    if unsubscribe_url is not None:
        text = _with_text_footer(text or "", unsubscribe_url)
        if html is not None:
            html = _with_footer(html, unsubscribe_url)
    return RenderedEmail(subject=" ".join(subject.split()), text=text, html=html)


def _with_text_footer(text: str, url: str) -> str:
    """text with the unsubscribe link after it."""
    return f"{text.rstrip()}\n\n--\nUnsubscribe: {url}\n"


_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)


def _with_footer(html: str, url: str) -> str:
    """html with the unsubscribe link after its content: before its last </body> outside a comment
    (one in Outlook's conditional comment, <!--[if mso]></body><![endif]-->, hid it from every other
    client), or at its end."""
    footer = (f'<p style="margin:24px 0 0;font-size:12px;line-height:18px;color:#6b7280;">'
              f'<a href="{escape(url, quote=True)}" target="_blank" style="color:#6b7280;">Unsubscribe</a></p>')
    # Comments blanked out, the same length, so that a </body> found is one outside them, where it is.
    uncommented = _COMMENT.sub(lambda comment: " " * len(comment.group()), html)
    ends = [m.start() for m in _BODY_END.finditer(uncommented)]
    if not ends:
        return html + _left_open(html) + footer
    return html[:ends[-1]] + footer + html[ends[-1]:]


# What HTML reads as something other than markup up to a closing sequence: a comment, and the elements
# whose content is text to their end tag (RCDATA and raw text: a browser shows a <textarea>'s as text,
# runs a <script>'s, shows nothing of a <title>'s in the message).
_OPENS = re.compile(r"<!--|<(script|style|textarea|title|xmp|iframe|noembed|noframes)\b", re.IGNORECASE)
_COMMENT_END = re.compile(r"-?>|.*?--!?>", re.DOTALL)


def _left_open(html: str) -> str:
    """What closes a comment or a text-only element that html leaves open at its end ("" when none is):
    a link appended inside one is a comment's words or a textarea's text, and no reader can click it."""
    at = 0
    while (opened := _OPENS.search(html, at)) is not None:
        if opened.group(1) is None:
            closed = _COMMENT_END.match(html, opened.end())  # "<!-->" and "<!--->" are whole comments
        else:
            # Past its start tag's ">", found with find: a pattern scanning for it from every "<script"
            # of a body full of them would take quadratic time.
            if (content := html.find(">", opened.end())) < 0:
                return ""
            closed = re.compile(rf"</{opened.group(1)}[\s/>]", re.IGNORECASE).search(html, content + 1)
        if closed is None:
            return "-->" if opened.group(1) is None else f"</{opened.group(1).lower()}>"
        at = closed.end()
    return ""


# An element no reader sees: a hidden preheader is display:none (often with more, mso-hide:all).
_HIDDEN = re.compile(r"(?:^|;)\s*display\s*:\s*none\s*(?:!important\s*)?(?:;|$)", re.IGNORECASE)
# The start tags that end an open element of these by HTML's rules, its end tag omitted (a <p> ends
# at the next block, a <li> at the next <li>, a cell at the next cell or row).
_ENDS = {
    "p": frozenset({"p", "div", "ul", "ol", "dl", "table", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
                    "hr", "section", "header", "footer", "address", "article", "aside", "nav", "main", "form",
                    "figure", "fieldset", "details", "center"}),
    "li": frozenset({"li"}), "dt": frozenset({"dt", "dd"}), "dd": frozenset({"dt", "dd"}),
    "tr": frozenset({"tr"}), "td": frozenset({"td", "th", "tr"}), "th": frozenset({"td", "th", "tr"}),
    "option": frozenset({"option", "optgroup"}),
}
# Elements without an end tag: one hidden hides nothing after it.
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                   "wbr"})


class _TextExtractor(HTMLParser):
    _SKIP = {"style", "script", "head", "title"}
    # HTML's block elements: each begins on a line of its own in a browser, so their words never run
    # together ("<section>Order 42</section><section>Total 9.99</section>").
    _BREAK = {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "caption", "ul", "ol",
              "dl", "dt", "dd", "blockquote", "pre", "hr", "address", "article", "aside", "details", "summary",
              "fieldset", "figure", "figcaption", "footer", "form", "header", "main", "nav", "section", "center"}

    _CELL = {"td", "th"}

    def __init__(self, hide: bool = True):
        super().__init__(convert_charrefs=True)
        self.hide = hide  # leave out elements styled display:none (see html_to_text)
        self.parts: list[str] = []
        self._skipping = 0
        # The elements styled display:none that are open, innermost last, each with how many elements
        # of its own name are open inside it.
        self._hidden: list[list] = []
        self._pre = 0  # inside <pre>: its spaces and line breaks are the text (a table drawn in text, code)
        self._link: tuple[str, int] | None = None  # the open <a>: its target, and where its text starts

    @property
    def _quiet(self) -> bool:
        """Whether what comes now is shown to no reader."""
        return bool(self._skipping or self._hidden)

    def handle_starttag(self, tag, attrs):
        # A start tag that ends the hidden element by HTML's own rule ("<p hidden>Preview<p>Hello":
        # the second <p> closes the first) ends its hiding.
        while self._hidden and not self._hidden[-1][1] and tag in _ENDS.get(self._hidden[-1][0], ()):
            self._hidden.pop()
        if self.hide and tag not in _VOID and _HIDDEN.search(dict(attrs).get("style") or ""):
            # Shown to no reader (an email's preheader, for the inbox list only): not in the text either.
            self._hidden.append([tag, 0])
            return
        if self._hidden and tag == self._hidden[-1][0] and tag not in _VOID:
            self._hidden[-1][1] += 1  # a <div> in the hidden <div>: its </div> does not end the hiding
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BREAK:
            self.parts.append("\n")
            if tag == "pre":
                self._pre += 1
                self.parts.append(_Preformatted())  # where a line break right after <pre> is dropped, as HTML does
        elif tag == "img":
            # What a reader sees where the image does not load, and the only words of a button that
            # is a picture ("<a href=...><img alt='Verify your email'></a>").
            alt = " ".join((dict(attrs).get("alt") or "").split())
            if alt and not self._quiet:
                self.parts.append(f" {alt} ")
        elif tag == "a":
            # Links do not nest: as in HTML5, an <a> inside another closes it first. (Every part of
            # the text then belongs to one link at most, so reading their words stays linear.)
            self._end_link()
            self._link = (_target(dict(attrs).get("href")), len(self.parts))

    def handle_endtag(self, tag):
        if self._hidden and tag == self._hidden[-1][0]:
            if not self._hidden[-1][1]:
                self._hidden.pop()
                return
            self._hidden[-1][1] -= 1
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BREAK:
            self.parts.append("\n")
            if tag == "pre" and self._pre:
                self._pre -= 1
        elif tag in self._CELL:
            self.parts.append(" ")  # cells side by side, not run together ("Mug2")
        elif tag == "a":
            self._end_link()

    def _end_link(self):
        # A link's target is what a reader of the text part needs to act on ("Verify", "Reset
        # password"): it follows the link's words, unless they are the target already.
        if self._link is None:
            return
        (url, start), self._link = self._link, None
        text = "".join(self.parts[start:])
        words = " ".join(text.split())
        if url and not self._quiet and words not in (url, url.removeprefix("mailto:")):
            if not words:
                self.parts.append(url)
            else:  # after the words, before any space that ends them: "Read more <url> and"
                self.parts.append(f"<{url}> " if text[-1].isspace() else f" <{url}>")

    def handle_data(self, data):
        if self._quiet:
            return
        if not self._pre:
            self.parts.append(data)
        elif self.parts and isinstance(self.parts[-1], _Preformatted) and not self.parts[-1]:  # a <pre>'s first words
            self.parts[-1] = _Preformatted(data.removeprefix("\r\n").removeprefix("\n"))
        else:
            self.parts.append(_Preformatted(data))

    def close(self):
        # A link still open at the end of the body is closed by it, as HTML5 closes it: the HTML part
        # shows it as a link, so the text part says where it goes too.
        super().close()
        self._end_link()

    def parse_marked_section(self, i, report=1):
        # "<![" before anything but the few keywords this Python's parser knows ("<![ ", "<![x]>")
        # raised AssertionError out of feed(): an HTML-only send holding one was accepted, then failed
        # every attempt. HTML5 reads it as a bogus comment, to the next ">", and so do we.
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            end = self.rawdata.find(">", i + 3)
            return -1 if end < 0 else end + 1


def _unused_character(parts: list[str]) -> str:
    """A private-use character none of parts holds, found in linear time (a body of "\ue000"s made a
    search for the shortest unused run of them quadratic: 10 s of a worker's CPU for 256 KB)."""
    present = set().union(*parts)
    for code in chain(range(0xE000, 0xF900), range(0xF0000, 0xFFFFE)):
        if chr(code) not in present:
            return chr(code)
    raise ValueError("no private-use character left unused")  # more than 71,000 distinct in one body


class _Preformatted(str):
    """Text of a <pre>: kept as it is, spaces and line breaks with it."""


def _target(href: str | None) -> str:
    """A link's target as the text part shows it: none for an anchor on the page or one that runs script."""
    url = " ".join((href or "").split())
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return ""
    return "" if not url or url.startswith("#") or scheme in _ACTIVE_SCHEMES else url


def _parsed(html: str, hide: bool) -> _TextExtractor:
    parser = _TextExtractor(hide)
    parser.feed(html)
    if parser.rawdata in ("<", "</"):
        # Nothing after them: HTML5 shows these as text ("less than 5 <"), as the parser would on close().
        parser.handle_data(parser.rawdata)
        parser.rawdata = ""
    elif parser.rawdata.startswith("<"):
        # A tag, comment or declaration left open at the end: what follows it is inside it, so a
        # browser shows none of it (HTML5 drops a tag and closes a comment at the end of input),
        # and neither do we. Left to close(), this Python's HTMLParser tries it again as a tag from
        # every "<" that follows (CVE-2025-6069): "<a " 85,000 times, a 256 KB body, took a worker
        # 12 minutes of CPU, on every retry.
        parser.rawdata = ""
    parser.close()
    return parser


def html_to_text(html: str) -> str:
    """A readable plain-text version of an HTML body, for the text/plain part."""
    parser = _parsed(html, hide=True)
    if parser._hidden:
        # An element styled display:none that never closed as written (a hidden <span> left open
        # in a hidden <div>, an end tag HTML implies): where its hiding ends is a guess, and a wrong
        # one lost every word after it. Read again showing it: a preheader too many beats no body.
        parser = _parsed(html, hide=False)
    # The text of a <pre> stands aside while the rest is tidied (each line's spaces made one, no more
    # than one blank line), under a mark the text does not hold, and comes back as it was.
    mark = _unused_character(parser.parts) if any(isinstance(p, _Preformatted) for p in parser.parts) else ""
    kept: list[str] = []


    def aside(part: str) -> str:
        if not isinstance(part, _Preformatted):
            return part
        kept.append(part)
        return f"{mark}{len(kept) - 1}{mark}"

    joined = "".join(map(aside, parser.parts))
    lines = [" ".join(line.split()) for line in joined.splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if kept:
        text = re.sub(f"{mark}([0-9]+){mark}", lambda found: kept[int(found[1])], text).rstrip()
    return text + "\n"
