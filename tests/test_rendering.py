"""The Renderer over the shipped templates, and literal emails."""

from __future__ import annotations

import time
import timeit

import pytest

from notifier.errors import PermanentDeliveryError
from notifier.rendering import Renderer, TemplateMissing, TemplateRenderError, html_to_text, literal
from notifier.runtime import DEFAULT_TEMPLATES_DIR

SHIPPED = ["digest", "order_confirmation", "password_reset", "verification", "welcome"]

SAMPLES = {
    "verification": ({"code": "482913", "name": "Ada"}, "Verify your email address", "482913"),
    "welcome": (
        {"name": "Ada", "action_url": "https://example.com/start"},
        "Welcome to Acme",
        "https://example.com/start",
    ),
    "password_reset": ({"reset_url": "https://example.com/reset?t=abc"}, "Reset your password", "reset?t=abc"),
    "order_confirmation": (
        {"order_id": "A-1001", "items": [{"name": "Widget", "quantity": 2, "price": "9.50"}], "total": "19.00"},
        "Order A-1001 confirmed",
        "Widget",
    ),
    "digest": (
        {"period": "weekly", "items": [{"subject": "New comment", "text": "Bob replied", "url": "https://e.x/1"}]},
        "Your weekly digest",
        "New comment",
    ),
}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(DEFAULT_TEMPLATES_DIR, brand_name="Acme")


def write_template(root, name: str, **parts: str) -> None:
    """Write templates/email/<name>.<part> files under root; part keys use _ for the dot (subject_txt)."""
    folder = root / "email"
    folder.mkdir(parents=True, exist_ok=True)
    for part, body in parts.items():
        (folder / f"{name}.{part.replace('_', '.')}").write_text(body)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_template_renders_subject_text_and_html(renderer, name):
    data, subject, marker = SAMPLES[name]

    email = renderer.render(name, data)

    assert email.subject == subject
    assert marker in email.text
    assert marker in email.html
    assert email.html.lstrip().startswith("<!DOCTYPE html>")
    assert "Acme" in email.text
    assert "{{" not in email.text and "{%" not in email.text


def test_only_notifier_sets_the_unsubscribe_link(renderer):
    # Data stored before the API refused an unsubscribe_url (and a digest's items, rendered from
    # theirs) never put a link of the caller's into the footer; notifier's own shows.
    theirs = {"name": "Ada", "unsubscribe_url": "https://evil.example/u"}

    without, with_ours = renderer.render("welcome", theirs), renderer.render("welcome", theirs, "https://ours.example/u")

    assert "evil.example" not in without.text + without.html and "Unsubscribe" not in without.text
    assert "evil.example" not in with_ours.text + with_ours.html
    assert "Unsubscribe: https://ours.example/u" in with_ours.text and 'href="https://ours.example/u"' in with_ours.html


def test_subject_is_one_line(renderer):
    subject = renderer.render("welcome", {}).subject

    assert "\n" not in subject and subject == subject.strip()


def test_html_escapes_caller_data_while_text_keeps_it(renderer):
    email = renderer.render("welcome", {"name": "<script>alert(1)</script>"})

    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "Hi <script>alert(1)</script>," in email.text


def test_missing_required_variable_raises_template_render_error(renderer):
    with pytest.raises(TemplateRenderError, match="reset_url"):
        renderer.render("password_reset", {"name": "Ada"})


def test_verification_without_code_or_url_raises_template_render_error(renderer):
    # In the caller's terms: it named a variable made up to be undefined, 'code_or_verification_url'.
    with pytest.raises(TemplateRenderError, match=r"^template 'verification': the data need a code or a "
                                                  r"verification_url$"):
        renderer.render("verification", {"name": "Ada"})


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("order_confirmation", {"order_id": "A-1", "items": 5, "total": "1"}),
        ("digest", {"items": 5}),
    ],
)
def test_data_of_the_wrong_shape_raises_template_render_error(renderer, name, data):
    # Caller data is arbitrary JSON: a number where a list belongs must be a permanent render error,
    # not a TypeError that the API turns into a 500 and the worker into a retry.
    with pytest.raises(TemplateRenderError):
        renderer.render(name, data)


def test_template_render_error_is_permanent(renderer):
    with pytest.raises(PermanentDeliveryError):
        renderer.render("password_reset", {})


@pytest.mark.parametrize(
    "name", ["nope", "../etc", "../etc/passwd", "_layout", "_macros", "", "Welcome", "email/welcome"]
)
def test_unknown_or_unsafe_names_do_not_exist(renderer, name):
    assert renderer.exists(name) is False


def test_rendering_an_unknown_template_is_a_transient_failure_an_operator_mends(renderer):
    # Known when the send was accepted (the API checks), missing now: a deploy under way.
    with pytest.raises(TemplateMissing, match="unknown template") as raised:
        renderer.render("../etc", {})
    assert raised.value.operator


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_templates_exist(renderer, name):
    assert renderer.exists(name) is True


def test_names_lists_the_five_shipped_templates(renderer):
    assert renderer.names() == SHIPPED


def test_names_is_empty_without_an_email_folder(tmp_path):
    assert Renderer(str(tmp_path)).names() == []


def test_template_without_subject_does_not_exist(tmp_path):
    write_template(tmp_path, "nosubject", txt="Hello")

    assert Renderer(str(tmp_path)).exists("nosubject") is False


def test_template_with_only_html_gets_a_derived_text_part(tmp_path):
    write_template(tmp_path, "onlyhtml", subject_txt="Hi", html="<p>Hello <b>{{ name }}</b></p><p>Bye</p>")

    email = Renderer(str(tmp_path)).render("onlyhtml", {"name": "Ada"})

    assert email.text == "Hello Ada\n\nBye\n"


def test_template_with_a_syntax_error_raises_template_render_error(tmp_path):
    write_template(tmp_path, "broken", subject_txt="Hi", txt="Hello {% if %}")

    with pytest.raises(TemplateRenderError):
        Renderer(str(tmp_path)).render("broken", {})


def test_template_rendering_an_empty_subject_raises_template_render_error(tmp_path):
    write_template(tmp_path, "blank", subject_txt="{{ subject_line }}", txt="Hello")

    with pytest.raises(TemplateRenderError, match="empty subject"):
        Renderer(str(tmp_path)).render("blank", {"subject_line": "  "})


def test_sandbox_refuses_access_to_python_internals(tmp_path):
    write_template(tmp_path, "sneaky", subject_txt="Hi", txt="{{ name.__class__.__mro__ }}")

    with pytest.raises(TemplateRenderError):
        Renderer(str(tmp_path)).render("sneaky", {"name": "Ada"})


def test_jinja_syntax_in_data_is_rendered_literally(renderer):
    email = renderer.render("welcome", {"name": "{{ 7*7 }}"})

    assert "{{ 7*7 }}" in email.text
    assert "49" not in email.text
    assert "49" not in email.html


def test_literal_with_only_html_derives_the_text_part():
    email = literal("Hello", None, "<h1>Title</h1><p>First &amp; second</p><script>x()</script>")

    assert email.html == "<h1>Title</h1><p>First &amp; second</p><script>x()</script>"
    assert email.text == html_to_text(email.html)
    assert email.text == "Title\n\nFirst & second\n"


def test_literal_keeps_caller_text_and_html_as_given():
    email = literal("Hello", "Plain {{ 7*7 }}", "<p>{{ 7*7 }}</p>")

    assert email.text == "Plain {{ 7*7 }}"
    assert email.html == "<p>{{ 7*7 }}</p>"


def test_literal_subject_whitespace_is_collapsed():
    assert literal("  Hello   there ", "body", None).subject == "Hello there"


def test_html_to_text_drops_style_and_head():
    html = "<html><head><title>T</title><style>p{color:red}</style></head><body><p>Visible</p></body></html>"

    assert html_to_text(html) == "Visible\n"


@pytest.mark.parametrize("items", [[], None])
def test_a_digest_with_no_items_says_there_is_nothing_new(renderer, items):
    # Caller data may hold null where the list would be: the digest says so rather than failing.
    email = renderer.render("digest", {"period": "daily", "items": items})

    assert "Nothing new today." in email.html
    assert "There's nothing new today." in email.text


_ORDINARY = "<p>Hello <a href=https://x.example/>world</a> and a few more words of a body.</p>\n"


def _times_as_slow_as_an_ordinary_body(convert, html: str) -> float:
    """How many times longer convert(html) takes than convert() of an ordinary body as long, both timed
    in this run: work that grows with the square of the input is tens to thousands of times slower,
    while a busy machine (a parallel suite, other processes) slows both alike, so no bound in seconds
    fails it. The fastest of three runs of each."""
    ordinary = (_ORDINARY * (len(html) // len(_ORDINARY) + 1))[: len(html)]
    took = [min(timeit.repeat(lambda body=body: convert(body), number=1, repeat=3)) for body in (html, ordinary)]
    return took[0] / took[1]


@pytest.mark.parametrize("html", ["<a " * 12_000, "<!--" * 30_000, '<a x="' * 8_000, "<p>Hi</p>" + "<a " * 12_000])
def test_an_html_body_left_open_at_the_end_converts_in_linear_time(html):
    # HTMLParser.close() tries an unfinished tag again from every "<" after it: each of these took
    # 5-20 s, and a body at MAX_BODY_BYTES 12 minutes of a worker's CPU (cut off by JOB_TIMEOUT, retried).
    assert _times_as_slow_as_an_ordinary_body(html_to_text, html) < 5
    text = html_to_text(html)
    assert text == ("Hi\n" if html.startswith("<p>") else "\n")


def test_an_html_body_left_open_at_the_end_keeps_the_text_before_it():
    assert html_to_text("<p>Hello <b>there</b></p><p>and <a href='x") == "Hello there\n\nand\n"
    assert html_to_text("<p>Kept</p><!-- never closed <p>hidden</p>") == "Kept\n"
    assert html_to_text("Tom &amp; Jerry &copy") == "Tom & Jerry ©\n"


@pytest.mark.parametrize("html, text", [("<p>Sizes: 3 <", "Sizes: 3 <\n"), ("1 </", "1 </\n"), ("a <", "a <\n")])
def test_a_lone_less_than_sign_at_the_end_is_text(html, text):
    # Nothing follows it, so it opens nothing: a browser shows it, and the text part said "3" alone.
    assert html_to_text(html) == text


@pytest.mark.parametrize("html, text", [
    ("<p>Before</p><![x]><p>After</p>", "Before\n\nAfter\n"),
    ("<p>Price</p><![ 5 ]> <p>Total</p>", "Price\n\nTotal\n"),
    ("<p>Kept</p><![ never closed", "Kept\n"),
    ("<p>a</p><![if mso]>x<![endif]>b", "a\nxb\n"),  # Outlook's conditionals, which it always knew
])
def test_a_marked_section_this_parser_does_not_know_is_skipped_not_raised(html, text):
    # "<![" before anything but "CDATA[", "if", "endif" and a few others raised AssertionError out of
    # HTMLParser.feed: an HTML-only send holding one was accepted, then failed on every attempt.
    assert html_to_text(html) == text
    assert literal("Hello", None, html).text == text


@pytest.mark.parametrize(("html", "text"), [
    ("<a href='https://x.example/r?a=1&amp;b=2'>Reset password</a>", "Reset password <https://x.example/r?a=1&b=2>\n"),
    ("<a href='https://x.example/'>https://x.example/</a>", "https://x.example/\n"),  # said once
    ("<a href='mailto:help@x.example'>help@x.example</a>", "help@x.example\n"),
    ("<a href='https://x.example/'><img src='logo.png'></a>", "https://x.example/\n"),  # a link with no words
    ("<a href='https://x.example/v'><img src='b.png' alt='Verify your email'></a>",
     "Verify your email <https://x.example/v>\n"),  # a button that is a picture: its words are its alt
    ("<a href='#top'>Top</a> <a href='javascript:alert(1)'>Run</a>", "Top Run\n"),  # nothing to open
    ("<a href='https://a.example/'>A <a href='https://b.example/'>B</a>", "A <https://a.example/> B <https://b.example/>\n"),
    ("<p>Verify: <a href='https://x.example/v'>verify your email", "Verify: verify your email <https://x.example/v>\n"),
])
def test_html_to_text_keeps_where_a_link_goes(html, text):
    assert html_to_text(html) == text


@pytest.mark.parametrize(("html", "text"), [
    ("<section>Order 42</section><section>Total 9.99</section>", "Order 42\n\nTotal 9.99\n"),
    ("<h5>Shipping</h5><blockquote>Leave at door</blockquote><footer>Acme</footer>",
     "Shipping\n\nLeave at door\n\nAcme\n"),
    ("<dl><dt>Code</dt><dd>424242</dd></dl>", "Code\n\n424242\n"),
    ("<p>Hi<img src='x.png' alt='Acme logo'>there</p><img src='spacer.gif' alt=''>", "Hi Acme logo there\n"),
    ("<head><title><img alt='no'></title></head>ok", "ok\n"),
])
def test_block_elements_begin_lines_and_images_say_their_alt(html, text):
    # In a browser each block begins on its own line and an image that does not load shows its alt:
    # the text part ran the blocks' words together ("Order 42Total 9.99") and dropped the alts.
    assert html_to_text(html) == text


def test_links_opened_inside_links_convert_in_linear_time():
    # Links do not nest (HTML5 closes one as the next opens); reading each one's words from where it
    # began took seconds for a body of 18,000 of them, one inside the other.
    html = "<a href=https://x.example/>" * 18_000 + "w" + "</a>" * 18_000
    assert _times_as_slow_as_an_ordinary_body(html_to_text, html) < 5
    text = html_to_text(html)
    assert text.count("https://x.example/") == 18_000


@pytest.mark.parametrize("name", SHIPPED)
def test_a_summary_is_the_templates_own_words_without_the_layouts_footer(renderer, name):
    # What a digest shows of each item: the footer once for the digest, not once per item.
    data, subject, marker = SAMPLES[name]

    summary_subject, text = renderer.summary(name, data)

    assert summary_subject == subject
    assert marker in text
    assert "This email was sent by" not in text and "Unsubscribe" not in text
    assert "This email was sent by Acme." in renderer.render(name, data).text


def test_a_summary_of_an_html_only_template_is_its_content_as_text(tmp_path):
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "_layout.html").write_text("<body>{% block content %}{% endblock %}<p>Footer</p></body>")
    write_template(tmp_path, "note", subject_txt="Note", html='{% extends "email/_layout.html" %}'
                   '{% block content %}<p>Hello {{ name }}</p>{% endblock %}')

    assert Renderer(str(tmp_path)).summary("note", {"name": "Ada"}) == ("Note", "Hello Ada\n")


@pytest.mark.parametrize("txt", [
    "Plain {{ name }}, no layout",  # nothing to leave out
    '{% extends "email/_layout.txt" %}{% set who = name %}{% block content %}Hi {{ who }}{% endblock %}',
], ids=["no-layout", "block-needs-the-whole-template"])
def test_a_summary_that_cannot_be_only_the_content_is_the_whole_text(tmp_path, txt):
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "_layout.txt").write_text("{% block content %}{% endblock %}\n--\nFooter")
    write_template(tmp_path, "note", subject_txt="Note", txt=txt)
    renderer = Renderer(str(tmp_path))

    assert renderer.summary("note", {"name": "Ada"})[1] == renderer.render("note", {"name": "Ada"}).text


def test_a_summary_refuses_what_a_send_would_refuse(renderer):
    with pytest.raises(TemplateRenderError):
        renderer.summary("password_reset", {})


def test_html_to_text_keeps_the_spaces_and_lines_of_a_pre_as_they_are():
    # A table drawn in text or a snippet of code is its spacing: made one space a line, it read "Mug 2".
    html = ("<p>Your   order</p><pre>\nItem      Qty\nMug         2\n\n\n\n  Total  9.99</pre>"
            "<p>Thanks</p><pre><code>def f():\n    return 1\n</code></pre>")

    assert html_to_text(html) == ("Your order\n\nItem      Qty\nMug         2\n\n\n\n  Total  9.99\n\nThanks\n\n"
                                  "def f():\n    return 1\n")


def test_html_to_text_of_a_pre_keeps_its_links_and_leaves_text_that_looks_like_its_marks_alone():
    assert html_to_text("<pre>see <a href='https://e.x/a'>this</a>   now</pre>") == "see this <https://e.x/a>   now\n"
    assert html_to_text("<p>&#xE000;0&#xE000;</p><pre> a  b</pre>") == "\ue0000\ue000\n\n a  b\n"


@pytest.mark.parametrize("html", ["<p>" + "\ue000" * 85_000, "<pre>x</pre>" + "\ue000" * 85_000,
                                  "<pre>" + "".join(map(chr, range(0xE000, 0xF900))) + "</pre>"])
def test_html_to_text_of_a_body_full_of_private_use_characters_takes_linear_time(html):
    # Looking for a run of them the text did not hold took 10 s of a worker's CPU for 256 KB.
    assert _times_as_slow_as_an_ordinary_body(html_to_text, html) < 5
    assert html_to_text(html).count("\ue000") == html.count("\ue000")  # and kept, every one


def test_a_literal_email_that_can_be_unsubscribed_from_ends_each_part_with_the_link():
    url = "https://n.example/unsubscribe/a&b"
    email = literal("Sale", None, "<HTML><BODY><p>Half price</p></BODY ></HTML>", unsubscribe_url=url)
    assert email.text == "Half price\n\n--\nUnsubscribe: https://n.example/unsubscribe/a&b\n"
    assert email.html.startswith("<HTML><BODY><p>Half price</p><p ") and email.html.endswith("</BODY ></HTML>")
    assert 'href="https://n.example/unsubscribe/a&amp;b"' in email.html
    fragment = literal("Sale", "Hi", "<p>Half price</p>", unsubscribe_url=url)
    assert fragment.html.startswith("<p>Half price</p><p ") and fragment.html.endswith("Unsubscribe</a></p>")
    assert literal("Code", "Hi", "<p>Hi</p>") == literal("Code", "Hi", "<p>Hi</p>", unsubscribe_url=None)


@pytest.mark.parametrize("html, text", [
    ('<div style="display:none;font-size:1px;">Your order shipped</div><p>Hello</p>', "Hello\n"),
    ('<span style="color:red; DISPLAY : none !important">x</span><p>Hello</p>', "Hello\n"),
    ('<div style="display:none"><div>inner</div>still hidden</div><p>Hello</p>', "Hello\n"),
    ('<img style="display:none" alt="logo"><p>Hello</p>', "logo\nHello\n"),  # void: hides nothing after it
    ('<div style="display:block">Shown</div>', "Shown\n"),
    # End tags HTML implies end the hiding where a browser ends it.
    ('<p style="display:none">Preview<p>Hello Ann</p>', "Hello Ann\n"),
    ('<ul><li style="display:none">a<li>Visible item</ul><p>After</p>', "Visible item\n\nAfter\n"),
    ('<table><tr style="display:none"><td>pre</td><tr><td>Row two</td></tr></table>', "Row two\n"),
    ('<div style="display:none">pre</head>x</div><p>Visible body</p>', "Visible body\n"),  # a stray end tag
    # Never closed as written: shown rather than guessed at, which lost every word after it.
    ('<div style="display:none">pre<span style="display:none">zz</div><p>Visible body</p>',
     "prezz\n\nVisible body\n"),
])
def test_html_to_text_leaves_out_what_no_reader_sees(html, text):
    # A preheader (the line an inbox list shows, hidden in the message) opened the text part.
    assert html_to_text(html) == text


def test_the_unsubscribe_link_of_a_literal_email_is_never_put_inside_a_comment():
    # After the last </body>: inside Outlook's conditional comment, which every other client hides.
    html = "<html><body><p>Hi</p></body></html><!--[if mso]></body><![endif]-->"
    footed = literal("Sale", "Hi", html, unsubscribe_url="https://n.example/u/t").html
    assert footed.index("Unsubscribe") < footed.index("</body></html><!--[if mso]>")


@pytest.mark.parametrize("html, closer", [
    ("<html><body><p>Hi</p><!-- cut short </body></html>", "-->"),
    ("<p>Hi</p><script>track()", "</script>"),
    ("<p>Hi</p><STYLE>p{color:red}", "</style>"),
    ("<p>Hi</p><textarea>notes", "</textarea>"),
    ("<p>Hi</p><!-- a --><script>a()</script ><textarea>notes", "</textarea>"),
])
def test_the_unsubscribe_link_of_a_literal_email_is_never_left_inside_what_its_html_leaves_open(html, closer):
    # Appended after a comment the HTML never closed, the link was part of the comment: the email
    # showed no way out but the List-Unsubscribe header. After an open <textarea>, it showed as text.
    footed = literal("Sale", "Hi", html, unsubscribe_url="https://n.example/u/t").html
    assert footed.startswith(html + closer + "<p ")
    assert footed.endswith('<a href="https://n.example/u/t" target="_blank" style="color:#6b7280;">Unsubscribe</a></p>')


@pytest.mark.parametrize("html", ["<p>Hi</p><!-- a --><p>b</p>", "<script>a('<!--')</script><p>b</p>",
                                  "<textarea>x</textarea><title>t</title>", "<p>Hi</p><scripts>x"])
def test_a_literal_emails_html_that_closes_what_it_opens_gets_the_link_as_it_is(html):
    footed = literal("Sale", "Hi", html, unsubscribe_url="https://n.example/u/t").html
    assert footed.startswith(html + "<p ")


def test_closing_what_a_literal_emails_html_leaves_open_takes_linear_time():
    html = "<p>Hi</p>" + "<script " * 32_000 + "<!-- -->" * 1000 + "<textarea>" * 25_000
    assert _times_as_slow_as_an_ordinary_body(
        lambda body: literal("Sale", "Hi", body, unsubscribe_url="https://n.example/u/t"), html) < 5


@pytest.mark.parametrize("html", [
    "{{ 1 / count }}",  # ZeroDivisionError
    "{% for i in range(10 ** 6) %}x{% endfor %}",  # OverflowError: over the sandbox's MAX_RANGE
    '{% include "email/loop.html" %}',  # RecursionError: it includes itself
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # RecursionError: a macro calling itself
])
def test_a_template_that_raises_as_it_renders_is_a_render_error(tmp_path, html):
    # A 500 at request time, and at send time (a template edited after the send was accepted) a
    # transient failure retried for RETRY_INTERVALS' hours, always to fail the same way.
    write_template(tmp_path, "loop", subject_txt="Hi", html=html)

    with pytest.raises(TemplateRenderError, match="template 'loop'"):
        Renderer(str(tmp_path)).render("loop", {"count": 0})


def test_a_template_file_that_is_not_utf8_says_so(tmp_path):
    write_template(tmp_path, "latin", subject_txt="Hi")
    (tmp_path / "email" / "latin.txt").write_bytes("Caf\u00e9 {{ name }}".encode("latin-1"))

    with pytest.raises(TemplateRenderError, match="not UTF-8") as raised:
        Renderer(str(tmp_path)).render("latin", {"name": "Ada"})
    assert "the data do not fit" not in str(raised.value)  # the file is wrong, not the caller's data


URL = "https://n.example/unsubscribe/tok"


@pytest.mark.parametrize("parts, text, html", [
    # Without the layout: each part ends with the link, as a literal send's does.
    ({"html": "<html><body><p>Hi {{ name }}</p></body></html>"}, f"Hi Ada\n\n--\nUnsubscribe: {URL}\n",
     f'<html><body><p>Hi Ada</p><p style="margin:24px 0 0;font-size:12px;line-height:18px;color:#6b7280;">'
     f'<a href="{URL}" target="_blank" style="color:#6b7280;">Unsubscribe</a></p></body></html>\n'),
    ({"txt": "Hi {{ name }}"}, f"Hi Ada\n\n--\nUnsubscribe: {URL}\n", None),
    # A part that shows the link itself is left as it is.
    ({"txt": "Hi {{ name }}\n{{ unsubscribe_url }}"}, f"Hi Ada\n{URL}\n", None),
])
def test_a_template_of_its_own_shape_shows_the_unsubscribe_link(tmp_path, parts, text, html):
    # The header alone is no visible way out; the shipped layout's footer shows the link, and a
    # template that does not extend it showed none.
    write_template(tmp_path, "own", subject_txt="Hi", **parts)

    email = Renderer(str(tmp_path)).render("own", {"name": "Ada"}, unsubscribe_url=URL)

    assert (email.text, email.html) == (text, html)
    assert Renderer(str(tmp_path)).render("own", {"name": "Ada"}).text.count("Unsubscribe") == 0


def test_a_template_extending_the_layout_shows_the_unsubscribe_link_once(renderer):
    email = renderer.render("welcome", {"name": "Ada"}, unsubscribe_url=URL)

    assert email.text.count(URL) == 1 and email.html.count(URL) == 1


@pytest.mark.parametrize("parts, data, said", [
    # A loop over the data makes an email of any size, built whole at every request and attempt: a
    # nested loop made 100 MB in 3 s, sent for the server to refuse. Held to a literal send's bounds.
    ({"html": "{% for a in rows %}{% for b in rows %}{{ a }}{{ b }}{% endfor %}{% endfor %}"},
     {"rows": ["x" * 100] * 1000}, r"its html is over 1,000,000 characters \(stopped at 2,000,000\)"),
    ({"txt": "{{ word * 1000 }}"}, {"word": "y" * 1001}, "its text is 1,001,000 characters, over 1,000,000"),
    ({"txt": "Hi", "subject_txt": "Order {{ id }}"}, {"id": "9" * 993}, "its subject is 999 characters, over 998"),
])
def test_a_template_rendering_past_an_emails_bounds_is_a_render_error(tmp_path, parts, data, said):
    write_template(tmp_path, "big", **{"subject_txt": "Hi", **parts})

    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match=f"template 'big'.*{said}"):
        Renderer(str(tmp_path)).render("big", data)
    assert time.monotonic() - started < 5  # stopped early, not after the 20 MB it would have made


def test_a_template_rendering_up_to_an_emails_bounds_is_rendered(tmp_path):
    write_template(tmp_path, "big", subject_txt="{{ s }}", txt="{{ t }}")

    email = Renderer(str(tmp_path)).render("big", {"s": "s" * 998, "t": "t" * 1_000_000})

    assert (len(email.subject), len(email.text)) == (998, 1_000_001)  # the part's line break after it


@pytest.mark.parametrize("txt, data", [
    ("{{ word * times }}", {"word": "y", "times": 10**9}),  # a gigabyte, made before any bound on output saw it
    ("{{ times * word }}", {"word": "y", "times": 10**9}),
    ("{{ (items * times) | length }}", {"items": [1], "times": 10**9}),
    ("{{ 10 ** (10 ** 8) }}", {}),  # minutes of CPU, and never folded at compile time
    ("{{ base ** power }}", {"base": 3, "power": 10**7}),
])
def test_a_template_repeating_or_raising_to_a_size_no_email_holds_is_a_render_error(tmp_path, txt, data):
    write_template(tmp_path, "huge", subject_txt="Hi", txt=txt)

    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match="template 'huge': a (repetition|power) of over"):
        Renderer(str(tmp_path)).render("huge", data)
    assert time.monotonic() - started < 2


def test_multiplying_within_an_emails_bounds_is_as_before(tmp_path):
    write_template(tmp_path, "sums", subject_txt="Hi",
                   txt="{{ q * p }} {{ '-' * 20 }} {{ 2 ** 64 }} {{ 1.5 * 2 }} {{ [0] * 3 }}")

    assert Renderer(str(tmp_path)).render("sums", {"q": 3, "p": 2.5}).text == (
        f"7.5 {'-' * 20} {2**64} 3.0 [0, 0, 0]\n")
