"""The browser chat (serve/web/static) driven in Debian's Chromium against the real app.

The app runs as ``python -m serve`` under uvicorn in a subprocess; Playwright's Python
API drives /usr/bin/chromium (its own browser download does not work here).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SHIPPED_MODEL
from tests.serve._browser_helpers import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    ChatClient,
    app_server,
    chromium_path,
    readme_screenshot,
)
from tests.serve._helpers_server import ServerProcess, running

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

TIMEOUT_MS = 30_000  # a bot reply on a busy 2-core machine
expect.set_options(timeout=TIMEOUT_MS)

# Records every change of every bot bubble: did the reply grow token by token, and was
# the typing indicator shown? (Runs in the page through DevTools, not subject to its CSP.)
RECORD_BOT_BUBBLES = """() => {
  window.__botFrames = [];
  const record = () => {
    for (const item of document.querySelectorAll('#messages .msg-bot')) {
      const frame = {
        replyId: item.dataset.replyId || '',
        text: item.querySelector('.bubble').textContent,
        typing: item.querySelector('.typing') !== null,
        streaming: item.classList.contains('streaming'),
      };
      const last = window.__botFrames.filter(f => f.replyId === frame.replyId).pop();
      if (!last || last.text !== frame.text || last.typing !== frame.typing
          || last.streaming !== frame.streaming) window.__botFrames.push(frame);
    }
  };
  new MutationObserver(record).observe(document.getElementById('messages'),
    {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def new_room() -> str:
    return "t" + uuid.uuid4().hex[:10]


# A few question/answer pairs a tiny model learns by heart in seconds, so that its replies
# are several tokens long (the suite's 30-step tiny model answers a lone "。": no streaming).
CHATTY_PAIRS = [
    ("你好", "你好呀，我是小X，很高兴认识你！"),
    ("今天天气怎么样", "今天天气真不错，我们出去走走吧。"),
    ("你喜欢做什么", "我喜欢聊天，也喜欢听你说话。"),
]


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory) -> Path:
    """A tiny model (embed 16, hidden 32) that answers with whole sentences."""
    pytest.importorskip("tensorflow")
    from export import export_model
    from training.config import TrainConfig
    from training.train import train

    work = tmp_path_factory.mktemp("chatty")
    corpus = work / "chatty.tsv"
    corpus.write_text("".join(f"{q}\t{a}\n" for _ in range(30) for q, a in CHATTY_PAIRS),
                      encoding="utf-8")
    config = TrainConfig(embed_dim=16, hidden_dim=32, batch_size=16, max_steps=150,
                         epochs=1000, min_freq=1, vocab_size=2000, seed=7, learning_rate=0.02,
                         dropout=0.0, patience=0, progress=False)
    train(config, corpora=[corpus], out=work / "checkpoint")
    export_model(work / "checkpoint", work / "model", quantize="none", check_samples=5)
    return work / "model"


def tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    """The tiny chatty model where TensorFlow is installed, else the shipped one.

    The page is under test here, not the model: the chatty model's replies are always
    several tokens long, which the streaming test needs (the shipped model may answer
    with one token).
    """
    if tensorflow_available() or not (SHIPPED_MODEL / "manifest.json").is_file():
        return request.getfixturevalue("chatty_model_dir")
    return SHIPPED_MODEL


@pytest.fixture(scope="module")
def app(model_dir) -> Iterator[ServerProcess]:
    """One app (in-process broker) for the module; each test uses its own room."""
    with running(app_server(model_dir)) as (server,):
        yield server


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.fail("chromium is not installed (apt-get install chromium)")
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class PageProblems:
    """JavaScript errors, CSP violations and dialogs seen by the pages of one test."""

    def __init__(self):
        self.errors: list[str] = []
        self.dialogs: list[str] = []

    def watch(self, page) -> None:
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            self.errors.append(f"CSP: {message.text}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def open_page(browser) -> Iterator:
    """``open_page(**context_options)``: a page in a fresh context (its own cookies)."""
    problems = PageProblems()
    contexts = []

    def factory(**options):
        context = browser.new_context(locale="zh-CN", **options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        problems.watch(page)
        return page

    factory.problems = problems
    yield factory
    for context in contexts:
        context.close()
    assert problems.errors == []
    assert problems.dialogs == []


def enter_room(page, base_url: str, user: str, room: str) -> None:
    """Logs in through the login form, then opens ``room`` and waits for the live stream."""
    page.goto(base_url + "/login")
    page.fill("#username", user)
    page.click("button[type=submit]")
    page.wait_for_url(base_url + "/")
    page.goto(f"{base_url}/?room={room}")
    expect(page.locator("#me")).to_have_text(user)
    expect(page.locator("body")).to_have_attribute("data-connection", "live")


def user_bubble(page, text: str):
    return page.locator("#messages .msg-user .bubble", has_text=text)


def settled_bot_messages(page):
    return page.locator("#messages .msg-bot[data-id]:not(.streaming)")


def rendered_ids(page) -> list[str]:
    return page.eval_on_selector_all("#messages [data-id]", "els => els.map(e => e.dataset.id)")


def test_login_send_and_see_the_streamed_reply(app, open_page, model_dir):
    page = open_page()
    room = new_room()
    enter_room(page, app.url, "小明", room)
    expect(page.locator("#room-name")).to_have_text("#" + room)
    page.evaluate(RECORD_BOT_BUBBLES)

    page.fill("#input", "你好")
    page.press("#input", "Enter")

    mine = page.locator("#messages .msg.mine")
    expect(mine.locator(".bubble")).to_have_text("你好")
    expect(mine.locator(".author")).to_have_text("小明")
    expect(page.locator("#input")).to_have_value("")
    expect(settled_bot_messages(page)).to_have_count(1)
    bot = settled_bot_messages(page)
    final = bot.locator(".bubble").text_content()
    assert final
    expect(bot.locator(".typing")).to_have_count(0)  # the indicator left with the final text
    expect(page.locator("#messages .msg-bot")).to_have_count(1)  # settled in place

    frames = page.evaluate("window.__botFrames")
    reply_id = bot.get_attribute("data-reply-id")
    frames = [f for f in frames if f["replyId"] == reply_id]
    assert any(f["typing"] for f in frames), frames
    partial = [f["text"] for f in frames if f["streaming"] and f["text"]]
    assert partial, f"no token reached the page before the final message: {frames}"
    assert all(final.startswith(t) for t in partial), (final, frames)
    if model_dir != SHIPPED_MODEL:  # a reply of several tokens: it grew piece by piece
        assert any(t != final for t in partial), (final, frames)
    assert frames[-1] == {"replyId": reply_id, "text": final, "typing": False,
                          "streaming": False}


def test_two_browsers_see_each_other(app, open_page):
    room = new_room()
    alice, bob = open_page(), open_page()
    enter_room(alice, app.url, "alice", room)
    enter_room(bob, app.url, "bob", room)

    alice.fill("#input", "bob 你好")
    alice.press("#input", "Enter")
    seen_by_bob = bob.locator("#messages .msg-user:not(.mine)", has_text="bob 你好")
    expect(seen_by_bob.locator(".author")).to_have_text("alice")

    bob.fill("#input", "alice 你好")
    bob.click("#send")
    seen_by_alice = alice.locator("#messages .msg-user:not(.mine)", has_text="alice 你好")
    expect(seen_by_alice.locator(".author")).to_have_text("bob")
    expect(alice.locator("#messages .msg.mine .bubble")).to_have_text(["bob 你好"])
    # both replies reach both pages
    expect(settled_bot_messages(alice)).to_have_count(2)
    expect(settled_bot_messages(bob)).to_have_count(2)


def test_reload_keeps_the_history(app, open_page):
    page = open_page()
    room = new_room()
    enter_room(page, app.url, "carol", room)
    # One exchange at a time: a reply still streaming when the next message is sent sits
    # where it began on the live page but after that message in history (by final id).
    for count, text in enumerate(("第一句", "第二句"), 1):
        page.fill("#input", text)
        page.press("#input", "Enter")
        expect(user_bubble(page, text)).to_have_count(1)
        expect(settled_bot_messages(page)).to_have_count(count)
    before = rendered_ids(page)

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-connection", "live")
    expect(page.locator("#messages .msg.mine .bubble")).to_have_text(["第一句", "第二句"])
    expect(settled_bot_messages(page)).to_have_count(2)
    assert rendered_ids(page) == before  # same messages, same order, nothing twice


def test_ime_composition_enter_does_not_send_and_shift_enter_is_a_newline(app, open_page):
    page = open_page()
    room = new_room()
    enter_room(page, app.url, "dave", room)
    sends = []
    page.on("request", lambda r: sends.append(r.url) if "/send" in r.url else None)

    page.fill("#input", "zhong")
    for init in ("{key: 'Enter', code: 'Enter', isComposing: true, keyCode: 229}",
                 "{key: 'Enter', code: 'Enter', isComposing: true}",
                 "{key: 'Enter', code: 'Enter', keyCode: 229}"):
        prevented = page.evaluate(f"""() => {{
            const e = new KeyboardEvent('keydown', {{bubbles: true, cancelable: true, ...{init}}});
            document.getElementById('input').dispatchEvent(e);
            return e.defaultPrevented;
        }}""")
        assert prevented is False, init  # the IME keeps its Enter
    page.wait_for_timeout(500)
    assert sends == []
    expect(page.locator("#input")).to_have_value("zhong")
    expect(page.locator("#messages .msg")).to_have_count(0)

    page.fill("#input", "第一行")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("第二行")
    expect(page.locator("#input")).to_have_value("第一行\n第二行")
    assert sends == []
    page.press("#input", "Enter")
    expect(page.locator("#messages .msg.mine .bubble")).to_have_text("第一行\n第二行")
    assert len(sends) == 1


def test_markup_in_a_message_shows_literally(app, open_page):
    page = open_page()
    room = new_room()
    enter_room(page, app.url, "eve", room)
    attack = "<img src=x onerror=alert(1)>"
    page.fill("#input", attack)
    page.press("#input", "Enter")
    expect(page.locator("#messages .msg.mine .bubble")).to_have_text(attack)
    expect(settled_bot_messages(page)).to_have_count(1)
    page.reload()  # the same text through /history
    expect(page.locator("#messages .msg.mine .bubble")).to_have_text(attack)
    page.wait_for_timeout(300)
    assert page.locator("img").count() == 0
    assert open_page.problems.dialogs == []


def test_pages_send_a_csp_and_obey_it(app, open_page):
    page = open_page()
    response = page.goto(app.url + "/login")
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy and "style-src 'self'" in policy, policy
    assert "unsafe-inline" not in policy
    expect(page.locator("h1")).to_have_text("小X 聊天室")
    page.fill("#username", "frank")
    page.click("text=登录")
    page.wait_for_url(app.url + "/")
    response = page.goto(app.url + "/?room=" + new_room())
    assert "script-src 'self'" in response.headers.get("content-security-policy", "")
    expect(page.locator("body")).to_have_attribute("data-connection", "live")
    # the stylesheet applied (a blocked one would leave the banner's [hidden] rule unset)
    assert page.eval_on_selector("#messages", "e => getComputedStyle(e).overflowY") == "auto"
    # CSP violations would be reported by open_page's checks at teardown


def test_login_errors_show_as_text(app, open_page):
    page = open_page()
    page.goto(app.url + "/login")
    page.fill("#username", "小X")  # the bot's name is taken
    page.click("button[type=submit]")
    page.wait_for_url("**/login?error=*")
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#login-error")).not_to_be_empty()
    assert page.request.get(app.url + "/me").status == 401  # not logged in

    expect(page.locator("#login-error")).to_have_text("这是小X自己的名字，请换一个昵称。")

    # Only known codes are shown, as the page's own text: nothing from the URL.
    attack = "<img src=x onerror=alert(1)>"
    page.goto(app.url + "/login?error=" + attack)
    expect(page.locator("#login-error")).to_have_text("登录失败，请重试。")
    assert page.locator("img").count() == 0


def test_logout(app, open_page):
    page = open_page()
    enter_room(page, app.url, "grace", new_room())
    page.click("#logout")
    page.wait_for_url(app.url + "/login")
    assert page.request.get(app.url + "/me").status == 401
    page.goto(app.url + "/")
    page.wait_for_url(app.url + "/login")


def test_autoscroll_does_not_fight_a_reader(app, open_page):
    page = open_page(viewport={"width": 390, "height": 500})
    room = new_room()
    enter_room(page, app.url, "heidi", room)
    other = ChatClient(app.url, "ivan")
    try:
        for i in range(6):
            other.send(room, f"第{i}条消息，" + "很长的一句话" * 6)
        expect(settled_bot_messages(page)).to_have_count(6)
        at_bottom = "e => e.scrollHeight - e.scrollTop - e.clientHeight < 5"
        assert page.eval_on_selector("#messages", "e => e.scrollHeight > e.clientHeight * 2")
        assert page.eval_on_selector("#messages", at_bottom)  # followed the newest
        expect(page.locator("#new-messages")).to_be_hidden()

        page.eval_on_selector("#messages", "e => { e.scrollTop = 0; }")
        other.send(room, "你在看旧消息吗")
        expect(user_bubble(page, "你在看旧消息吗")).to_have_count(1)
        expect(page.locator("#new-messages")).to_be_visible()
        assert page.eval_on_selector("#messages", "e => e.scrollTop") == 0  # left alone

        page.click("#new-messages")
        expect(page.locator("#new-messages")).to_be_hidden()
        assert page.eval_on_selector("#messages", at_bottom)
    finally:
        other.close()


@pytest.mark.redis
def test_server_restart_mid_session(model_dir, redis_server, open_page, tmp_path):
    """Kill the app, start it again: the page shows it is reconnecting, then catches up."""
    app = app_server(model_dir, redis_url=redis_server.url).start()
    other = None
    try:
        page = open_page()
        room = new_room()
        enter_room(page, app.url, "judy", room)
        page.fill("#input", "重启之前")
        page.press("#input", "Enter")
        expect(settled_bot_messages(page)).to_have_count(1)
        expect(page.locator("#banner")).to_be_hidden()

        # Keep the page's stream down until the message below is stored, so that it is
        # certainly sent while the page is disconnected.
        page.route("**/stream?*", lambda route: route.abort())
        app.kill()
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner")).to_have_text("重新连接中…")
        expect(page.locator("body")).to_have_attribute("data-connection", "reconnecting")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "chat-reconnecting.png")

        app.start()
        other = ChatClient(app.url, "kim")
        other.send(room, "你掉线的时候我说了话")
        other.wait_for_reply(room, "你掉线的时候我说了话")
        expect(page.locator("#banner")).to_be_visible()

        page.unroute("**/stream?*")
        expect(page.locator("#banner")).to_be_hidden()
        expect(page.locator("body")).to_have_attribute("data-connection", "live")
        expect(user_bubble(page, "你掉线的时候我说了话")).to_have_count(1)
        expect(settled_bot_messages(page)).to_have_count(2)
        expect(user_bubble(page, "重启之前")).to_have_count(1)
        ids = rendered_ids(page)
        assert len(ids) == len(set(ids)) == 4

        # still live after the restart, and the session cookie survived it
        page.fill("#input", "重启之后")
        page.press("#input", "Enter")
        expect(user_bubble(page, "重启之后")).to_have_count(1)
        expect(settled_bot_messages(page)).to_have_count(3)
    finally:
        if other:
            other.close()
        app.stop()


def test_two_people_of_one_name_are_told_apart(app, open_page):
    room = new_room()
    first, second = open_page(), open_page()
    enter_room(first, app.url, "同名", room)
    enter_room(second, app.url, "同名", room)
    first.fill("#input", "我是第一个")
    first.press("#input", "Enter")
    on_second = second.locator("#messages .msg-user", has_text="我是第一个")
    expect(on_second).not_to_have_class(re.compile(r"\bmine\b"))  # same name, not ours
    second.fill("#input", "我是第二个")
    second.press("#input", "Enter")
    expect(second.locator("#messages .msg.mine .bubble")).to_have_text(["我是第二个"])
    tags = [page.locator("#messages .msg.mine .tag").text_content() for page in (first, second)]
    assert all(re.fullmatch("#[0-9a-f]{6}", t) for t in tags) and tags[0] != tags[1], tags
    expect(on_second.locator(".tag")).to_have_text(tags[0])


@pytest.mark.redis
def test_a_reset_reloads_the_history(model_dir, redis_server, open_page):
    """The page was away while the room's log was trimmed past its last id: the server
    says ``reset`` and the page reloads /history instead of showing a gap."""
    import json

    import redis

    app = app_server(model_dir, redis_url=redis_server.url).start()
    try:
        page = open_page()
        room = new_room()
        enter_room(page, app.url, "linda", room)
        page.fill("#input", "修剪之前")
        page.press("#input", "Enter")
        expect(settled_bot_messages(page)).to_have_count(1)
        page.route("**/stream?*", lambda route: route.abort())
        app.kill()  # the page's stream ends; it keeps its last event id
        expect(page.locator("#banner")).to_be_visible()
        with redis.Redis.from_url(redis_server.url) as r:
            # Only in history (and before the log's end, where /history reads up to): only
            # a reload of /history can show it.
            only = json.dumps({"room": room, "role": "user", "user": "mia", "text": "只在历史里",
                               "ts": time.time()})
            r.xadd(f"xiaox:{{{room}}}:messages", {"type": "message", "data": only})
            filler = json.dumps({"room": room, "user": "filler", "ts": 1})
            for _ in range(400):  # the page's last id is trimmed away (MAXLEN ~ as served)
                r.xadd(f"xiaox:{{{room}}}:log", {"type": "join", "data": filler}, maxlen=50)
        app.start()
        page.unroute("**/stream?*")
        expect(page.locator("body")).to_have_attribute("data-connection", "live")
        expect(user_bubble(page, "只在历史里")).to_have_count(1)
        expect(user_bubble(page, "修剪之前")).to_have_count(1)
        expect(page.locator("#messages .notice", has_text="filler")).to_have_count(0)
        ids = rendered_ids(page)
        assert len(ids) == len(set(ids)) == 3
    finally:
        app.stop()



def set_sizes(page) -> list[int]:
    """The size of every ``Set`` alive in the page's heap (DevTools' queryObjects: the
    page's own state, closure-private, is counted without exposing it)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("HeapProfiler.collectGarbage")
    prototype = cdp.send("Runtime.evaluate", {"expression": "Set.prototype"})["result"]
    sets = cdp.send("Runtime.queryObjects", {"prototypeObjectId": prototype["objectId"]})
    sizes = cdp.send("Runtime.callFunctionOn", {
        "objectId": sets["objects"]["objectId"], "returnByValue": True,
        "functionDeclaration": "function () { return this.map(s => s.size); }"})
    return sizes["result"]["value"]


def test_the_page_remembers_a_bounded_number_of_ids(model_dir, redis_server, open_page):
    """A long-lived page (thousands of events) keeps its de-duplication memory bounded:
    the seen event ids and the settled reply ids are capped, oldest forgotten first."""
    import json

    import redis

    app = app_server(model_dir, redis_url=redis_server.url).start()
    try:
        page = open_page()
        room = new_room()
        enter_room(page, app.url, "nora", room)
        with redis.Redis.from_url(redis_server.url) as r:
            pipe = r.pipeline(transaction=False)
            for i in range(1_300):  # a person's message and 小X's answer, 2,600 events
                for data in ({"role": "user", "user": "olga", "text": f"第{i}条"},
                             {"role": "bot", "user": "小X", "text": f"答{i}",
                              "reply_id": f"r{i}", "reply_to": "0-1"}):
                    pipe.xadd(f"xiaox:{{{room}}}:log", {"type": "message", "data": json.dumps(
                        {**data, "room": room, "ts": time.time()}, ensure_ascii=False)})
            pipe.execute()
        expect(user_bubble(page, "第1299条")).to_have_count(1)
        sizes = set_sizes(page)
        assert sizes and max(sizes) <= 2_000, sorted(sizes)[-5:]
        assert len(page.locator("#messages [data-id]").all()) <= 500
    finally:
        app.stop()

def populate(app: ServerProcess, page, room: str) -> None:
    friend = ChatClient(app.url, "小红")
    try:
        friend.send(room, "大家好！今天天气真不错。")
        friend.wait_for_reply(room, "大家好！今天天气真不错。")
    finally:
        friend.close()
    for text in ("你好，小X", "你喜欢做什么？"):
        page.fill("#input", text)
        page.press("#input", "Enter")
        expect(user_bubble(page, text)).to_have_count(1)
        expect(page.locator("#messages .msg-bot.streaming")).to_have_count(0)
    expect(settled_bot_messages(page)).to_have_count(3)


@pytest.mark.parametrize("size", [
    pytest.param({"name": "phone", "viewport": {"width": 390, "height": 844},
                  "device_scale_factor": 2, "is_mobile": True, "has_touch": True}, id="phone"),
    pytest.param({"name": "desktop", "viewport": {"width": 1280, "height": 800}}, id="desktop"),
])
def test_screenshots(app, open_page, size):
    options = {k: v for k, v in size.items() if k != "name"}
    page = open_page(**options)
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(app.url + "/login")
    page.screenshot(path=ARTIFACTS / f"login-{size['name']}.png")
    room = new_room()
    enter_room(page, app.url, "小明", room)
    populate(app, page, room)
    page.fill("#input", "正在输入的一句话")
    # the page fits the screen: no sideways scrolling, the composer is on screen
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.locator("#send")).to_be_in_viewport()
    path = ARTIFACTS / f"chat-{size['name']}.png"
    page.screenshot(path=path)
    assert path.stat().st_size > 10_000


def test_the_readme_screenshot_of_a_real_exchange(request):
    """``XIAOX_SCREENSHOT=docs/chat.png pytest -k readme_screenshot``: the shipped model
    (or $XIAOX_TEST_MODEL) answering in the shared room, at 900x600."""
    target = readme_screenshot()
    if target is None:
        pytest.skip("set XIAOX_SCREENSHOT=docs/chat.png to take the README's screenshot")
    open_page = request.getfixturevalue("open_page")  # no browser started for a skip
    model = Path(os.environ.get("XIAOX_TEST_MODEL") or SHIPPED_MODEL)
    with running(app_server(model)) as (server,):
        page = open_page(viewport={"width": 900, "height": 600})
        page.goto(server.url + "/login")
        page.fill("#username", "小明")
        page.click("button[type=submit]")
        page.wait_for_url(server.url + "/")  # the shared room
        expect(page.locator("body")).to_have_attribute("data-connection", "live")
        friend = ChatClient(server.url, "小红")
        try:
            friend.send("lobby", "大家好！")
            friend.wait_for_reply("lobby", "大家好！")
        finally:
            friend.close()
        for count, text in enumerate(("你好", "今天好冷"), 2):
            page.fill("#input", text)
            page.press("#input", "Enter")
            expect(settled_bot_messages(page)).to_have_count(count)
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target)
    assert 10_000 < target.stat().st_size < 150_000
