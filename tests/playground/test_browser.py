"""The playground in a real headless browser against a real `hope serve`: a streamed reply, every
token coloured by surprise, the same fact read with less surprise the second time, the session
panel, and the session actions (fork, export, import, delete) with their confirmations."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.server.support import ServerProcess

pytest.importorskip("selenium", reason="the selenium package is not installed (pip install selenium)")

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

FACT = "My favourite colour is teal and my cat is called Pixel."
# records, at every change of the page while the reply streams, how many chunks it shows
WATCH_REPLY = """
window.replyChunks = [];
new MutationObserver(() => {
  const live = document.querySelector('article.msg.assistant[data-state="streaming"]');
  if (live) window.replyChunks.push(live.dataset.chunks || "0");
}).observe(document.getElementById('transcript'), {subtree: true, childList: true, attributes: true});
"""


def wait(driver, condition, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def set_field(driver, field_id: str, value: str) -> None:
    field = driver.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(value)


def deterministic(driver) -> None:
    for field_id, value in (("temperature", "0"), ("max_tokens", "12"), ("seed", "7")):
        set_field(driver, field_id, value)


def send(driver, text: str) -> None:
    done = len(driver.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="done"]'))
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="done"]')) == done + 2)


def ready(driver) -> None:
    wait(driver, lambda d: d.find_element(By.ID, "status").text == "ready"
         and d.find_element(By.ID, "panel-id").text != "")


def stat(driver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'#stats dd[data-stat="{name}"]').text


def dialog(driver, value: str | None = None, accept: bool = True) -> str:
    """Answer the page's confirmation dialog; returns its text."""
    box = wait(driver, lambda d: d.find_element(By.ID, "dialog") if d.find_element(By.ID, "dialog").is_displayed()
               else None)
    text = box.find_element(By.ID, "dialog-text").text
    if value is not None:
        set_field(driver, "dialog-input", value)
    driver.find_element(By.ID, "dialog-ok" if accept else "dialog-cancel").click()
    wait(driver, lambda d: not d.find_element(By.ID, "dialog").is_displayed())
    return text


def listed(driver) -> list[str]:
    """The session ids in the page's list (read in one go: the list is rebuilt as sessions change)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#session-list button.session')].map(b => b.dataset.id)")


def test_chat_streams_colours_every_token_and_shows_learning(server: ServerProcess, open_page, tmp_path: Path
                                                             ) -> None:
    page = open_page(server.base_url)
    ready(page)
    assert not page.find_element(By.ID, "key-form").is_displayed()  # this server has no keys
    assert page.find_element(By.ID, "intro").is_displayed()
    sid = page.find_element(By.ID, "panel-id").text
    deterministic(page)
    page.execute_script(WATCH_REPLY)

    send(page, FACT)
    user, reply = page.find_elements(By.CSS_SELECTOR, "article.msg")
    assert user.get_attribute("data-role") == "user" and reply.get_attribute("data-role") == "assistant"
    # the reply streamed in: the page showed it growing, chunk after chunk
    shown = page.execute_script("return window.replyChunks")
    assert len(set(shown)) >= 3, shown
    assert int(page.find_element(By.ID, "transcript").get_attribute("data-chunks")) >= 3
    assert reply.find_element(By.CSS_SELECTOR, ".body").text.strip()

    # every token of the message and of the reply is coloured by its loss
    spans = user.find_elements(By.CSS_SELECTOR, ".body .tok")
    assert "".join(s.text for s in spans) == FACT
    assert len(spans) == int(user.get_attribute("data-tokens")) >= 10
    for span in spans + reply.find_elements(By.CSS_SELECTOR, ".body .tok"):
        assert float(span.get_attribute("data-loss")) > 0
        assert span.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
    assert len(reply.find_elements(By.CSS_SELECTOR, ".body .tok")) >= 1
    ActionChains(page).move_to_element(spans[4]).perform()
    tip = wait(page, lambda d: d.find_element(By.ID, "tip") if d.find_element(By.ID, "tip").is_displayed() else None)
    shown = re.search(r"loss (\d+\.\d+) nats", tip.text)
    assert shown and abs(float(shown.group(1)) - float(spans[4].get_attribute("data-loss"))) < 0.006, tip.text

    # the panel shows what the session absorbed and how its memories moved
    wait(page, lambda d: stat(d, "version") == "1")
    info = httpx.get(f"{server.base_url}/v1/sessions/{sid}").json()
    assert stat(page, "tokens_absorbed").split()[0] == str(info["tokens_absorbed"])
    fast = page.find_element(By.CSS_SELECTOR, '#levels tr[data-level="fast"]').text.split()
    assert fast[1] == str(info["updates"]["fast"]) and fast[1] != "0" and fast[2] != "–"
    plotted = int(page.find_element(By.ID, "plot").get_attribute("data-tokens"))
    assert plotted == int(user.get_attribute("data-tokens")) + int(reply.get_attribute("data-tokens"))
    assert sid in listed(page)

    # the same fact again: the page reads it with less surprise, the session learned it
    user.find_element(By.CSS_SELECTOR, "button.again").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="done"]')) == 4)
    first, _, again, _ = page.find_elements(By.CSS_SELECTOR, "article.msg")
    before, after = float(first.get_attribute("data-mean-loss")), float(again.get_attribute("data-mean-loss"))
    assert after < before - 0.02, (before, after)
    assert "said before" in again.find_element(By.CSS_SELECTOR, ".meta").text
    assert "learned" in again.get_attribute("class")
    wait(page, lambda d: stat(d, "version") == "2")

    shot = tmp_path / "playground.png"
    page.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    # the transcript survives a reload (kept in this browser), colours included
    page.refresh()
    ready(page)
    assert page.find_element(By.ID, "panel-id").text == sid
    assert len(page.find_elements(By.CSS_SELECTOR, "article.msg")) == 4
    assert not page.find_element(By.ID, "intro").is_displayed()
    errors = [e["message"] for e in page.get_log("browser")
              if e["level"] == "SEVERE" and "404 (Not Found)" not in e["message"]]  # a new session's first look
    assert not errors, errors


def test_fork_export_import_and_delete_with_confirmations(server: ServerProcess, open_page, downloads: Path
                                                         ) -> None:
    page = open_page(server.base_url)
    ready(page)
    deterministic(page)
    page.find_element(By.ID, "new-session").click()  # a session of our own naming
    assert page.find_element(By.ID, "dialog-input").get_attribute("value").startswith("play-")
    sid = f"actions-{time.monotonic_ns()}"
    dialog(page, sid)
    wait(page, lambda d: d.find_element(By.ID, "panel-id").text == sid and sid in listed(d))
    assert "not stored yet" in page.find_element(By.ID, "panel-status").text
    assert page.find_element(By.ID, "fork").get_attribute("disabled")  # nothing stored yet
    send(page, "Remember: the door code is 4711.")
    wait(page, lambda d: not d.find_element(By.ID, "fork").get_attribute("disabled"))
    tokens = httpx.get(f"{server.base_url}/v1/sessions/{sid}").json()["tokens_absorbed"]

    # fork: the dialog proposes an id, we pick another
    page.find_element(By.ID, "fork").click()
    assert page.find_element(By.ID, "dialog-input").get_attribute("value") == f"{sid}-fork"
    fork = f"{sid}-copy"
    assert sid in dialog(page, fork)
    wait(page, lambda d: d.find_element(By.ID, "panel-id").text == fork and fork in listed(d))
    assert httpx.get(f"{server.base_url}/v1/sessions/{fork}").json()["tokens_absorbed"] == tokens
    assert "forked from" in page.find_element(By.ID, "transcript").text
    assert len(page.find_elements(By.CSS_SELECTOR, "article.msg")) == 2  # the transcript came along

    # export downloads the fork's state; import uploads it into another session
    page.find_element(By.ID, "export").click()
    exported = downloads / f"{fork}.safetensors"
    deadline = time.monotonic() + 20
    while not (exported.is_file() and exported.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exported.is_file()
    assert exported.read_bytes() == httpx.get(f"{server.base_url}/v1/sessions/{fork}/state").content
    file_input = page.find_element(By.ID, "import-file")
    page.execute_script("arguments[0].hidden = false", file_input)
    file_input.send_keys(str(exported))
    assert page.find_element(By.ID, "dialog-input").get_attribute("value") == fork
    imported = f"{sid}-imported"
    assert "replaced" in dialog(page, imported)
    wait(page, lambda d: d.find_element(By.ID, "panel-id").text == imported and imported in listed(d))
    assert httpx.get(f"{server.base_url}/v1/sessions/{imported}").json()["tokens_absorbed"] == tokens

    # delete asks first: cancelled, nothing happens; confirmed, the session is gone
    page.find_element(By.ID, "delete").click()
    assert imported in dialog(page, accept=False)
    assert httpx.get(f"{server.base_url}/v1/sessions/{imported}").status_code == 200
    for gone in (imported, fork):
        wait(page, lambda d, gone=gone: d.find_element(By.CSS_SELECTOR, f'button.session[data-id="{gone}"]'))
        page.find_element(By.CSS_SELECTOR, f'button.session[data-id="{gone}"]').click()
        wait(page, lambda d, gone=gone: d.find_element(By.ID, "panel-id").text == gone
             and not d.find_element(By.ID, "delete").get_attribute("disabled"))
        page.find_element(By.ID, "delete").click()
        assert "cannot be undone" in dialog(page)
        wait(page, lambda d, gone=gone: gone not in listed(d) and d.find_element(By.ID, "panel-id").text != gone)
        assert httpx.get(f"{server.base_url}/v1/sessions/{gone}").status_code == 404
    assert sid in listed(page)


def test_api_key_field_when_the_server_has_keys(keyed_server: ServerProcess, open_page) -> None:
    page = open_page(keyed_server.base_url)
    wait(page, lambda d: d.find_element(By.ID, "key-form").is_displayed())
    assert "API key" in page.find_element(By.ID, "status").text
    set_field(page, "api-key", "wrong-key")
    page.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(page, lambda d: "refused" in d.find_element(By.ID, "status").text)

    # a refusal while the user types a key (the panel's refresh, the list's) leaves the field alone
    set_field(page, "api-key", "acme-k")
    page.find_element(By.ID, "refresh-sessions").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('api-key').title") != "")
    assert page.find_element(By.ID, "api-key").get_attribute("value") == "acme-k"

    set_field(page, "api-key", "acme-key")
    page.find_element(By.CSS_SELECTOR, "#key-form button").click()
    ready(page)
    assert page.execute_script("return localStorage.getItem('hope.playground.apiKey')") == "acme-key"
    deterministic(page)
    sid = page.find_element(By.ID, "panel-id").text
    page.find_element(By.ID, "example").click()  # the intro's button sends an example fact
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="done"]')) == 2)
    assert page.find_element(By.CSS_SELECTOR, "article.msg.user .body").text == FACT
    assert page.find_elements(By.CSS_SELECTOR, "article.msg .tok")
    acme = httpx.get(f"{keyed_server.base_url}/v1/sessions/{sid}", headers={"Authorization": "Bearer acme-key"})
    assert acme.status_code == 200 and acme.json()["version"] == 1
    globex = httpx.get(f"{keyed_server.base_url}/v1/sessions/{sid}", headers={"Authorization": "Bearer globex-key"})
    assert globex.status_code == 404  # the key's tenant owns the session

    page.refresh()  # the key is remembered
    ready(page)
    assert page.find_element(By.ID, "panel-id").text == sid


def test_the_current_session_beyond_the_first_page_is_listed_once_as_stored(server: ServerProcess,
                                                                            open_page) -> None:
    """The list shows 50 sessions a page: a stored current session on a later page is listed
    first with its version (not as "new"), and the page that holds it does not list it again."""
    base = server.base_url
    ids = [f"page-{i:02d}" for i in range(52)] + ["zz-current"]
    for sid in ids:
        if httpx.get(f"{base}/v1/sessions/{sid}").status_code == 404:
            r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "hope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "session_id": sid})
            assert r.status_code == 200
    page = open_page(base)
    page.execute_script("localStorage.setItem('hope.playground.session', 'zz-current')")
    page.refresh()
    ready(page)
    wait(page, lambda d: "zz-current" in listed(d))
    first = page.find_element(By.CSS_SELECTOR, '#session-list button.session[data-id="zz-current"] small').text
    assert first != "new" and "v1" in first
    while page.find_element(By.ID, "more-sessions").is_displayed():
        page.find_element(By.ID, "more-sessions").click()
        time.sleep(0.3)
    wait(page, lambda d: all(sid in listed(d) for sid in ids))
    assert listed(page).count("zz-current") == 1


def test_stop_ends_the_reply_and_stores_nothing(server: ServerProcess, open_page) -> None:
    page = open_page(server.base_url)
    ready(page)
    deterministic(page)
    sid = page.find_element(By.ID, "panel-id").text
    send(page, FACT)
    version = httpx.get(f"{server.base_url}/v1/sessions/{sid}").json()["version"]

    set_field(page, "max_tokens", "4000")
    page.find_element(By.ID, "input").send_keys("Tell me a long story.")
    page.find_element(By.ID, "send").click()
    wait(page, lambda d: int(d.find_element(By.CSS_SELECTOR, 'article.assistant[data-state="streaming"]')
                         .get_attribute("data-chunks") or 0) >= 5)
    page.find_element(By.ID, "stop").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="stopped"]')) == 2)
    assert "nothing was stored" in page.find_elements(By.CSS_SELECTOR, "article.msg")[-1].text
    assert page.find_element(By.ID, "send").is_displayed()
    # the next turn waits for the stopped one to let go of the session, and is the only one stored
    set_field(page, "max_tokens", "12")
    send(page, FACT)
    assert httpx.get(f"{server.base_url}/v1/sessions/{sid}").json()["version"] == version + 1


def test_a_stop_after_the_server_finished_says_the_turn_was_stored(server: ServerProcess, open_page) -> None:
    """Stop clicked as the last token shows: the server has already committed, and the chunks that
    say so are still unread. The page must not say "nothing was stored" (a user would send the
    turn again, and the session would absorb it twice)."""
    page = open_page(server.base_url)
    ready(page)
    deterministic(page)
    sid = page.find_element(By.ID, "panel-id").text
    send(page, "warm up")
    page.execute_script("""
      new MutationObserver(() => {  // Stop, the moment the reply shows its 12th (last) token
        const a = [...document.querySelectorAll('article.msg.assistant')].at(-1);
        if (a && a.dataset.state === 'streaming' && Number(a.dataset.tokens) >= 12 && !a.dataset.clicked) {
          a.dataset.clicked = '1'; document.getElementById('stop').click();
        }
      }).observe(document.getElementById('transcript'), {subtree: true, attributes: true, childList: true});""")
    # Under load the last chunks can arrive with the 12th token: then there is no Stop, or a Stop
    # that lands after the page has read every chunk and ends the reply normally. Try again.
    for _ in range(8):
        version = httpx.get(f"{server.base_url}/v1/sessions/{sid}").json()["version"]
        page.find_element(By.ID, "input").send_keys("a turn stopped too late")
        page.find_element(By.ID, "send").click()
        wait(page, lambda d: d.find_element(By.ID, "send").is_displayed()
             and d.find_elements(By.CSS_SELECTOR, "article.msg.assistant")[-1].get_attribute("data-state")
             != "streaming")
        reply = page.find_elements(By.CSS_SELECTOR, "article.msg.assistant")[-1]
        if reply.get_attribute("data-clicked") and "stopped" in reply.text:
            break
    else:
        pytest.fail("Stop never came before the page had read the whole reply")
    last = page.find_elements(By.CSS_SELECTOR, "article.msg")[-1]
    try:
        wait(page, lambda d: "stored" in last.text)  # the page's verdict, either way
    except TimeoutException:
        pytest.fail(f"the stopped turn shows no verdict: {last.text!r}")
    time.sleep(1.5)  # a commit the page did not see would have landed by now
    stored = httpx.get(f"{server.base_url}/v1/sessions/{sid}").json()["version"] > version
    assert ("nothing was stored" in last.text) != stored, (last.text, stored)


def test_characters_split_over_tokens_read_as_typed(server: ServerProcess, open_page) -> None:
    text = "Crème brûlée ☕ at 7 — 日本語 🙂 ok"
    page = open_page(server.base_url)
    ready(page)
    deterministic(page)
    send(page, text)
    user = page.find_element(By.CSS_SELECTOR, "article.msg.user")
    spans = user.find_elements(By.CSS_SELECTOR, ".body .tok")
    shown = page.execute_script("return arguments[0].textContent", user.find_element(By.CSS_SELECTOR, ".body"))
    assert shown == text and "\ufffd" not in shown
    # some characters took several tokens: such a piece is one span carrying all their losses
    assert sum(int(s.get_attribute("data-tokens")) for s in spans) == int(user.get_attribute("data-tokens"))
    assert len(spans) < int(user.get_attribute("data-tokens"))



def use_key(driver, key: str) -> None:
    set_field(driver, "api-key", key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    ready(driver)


def start_long_reply(driver, text: str) -> None:
    """Sends `text` with room for thousands of tokens; returns once the reply is streaming."""
    set_field(driver, "max_tokens", "4000")
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: int(d.find_element(By.CSS_SELECTOR, 'article.assistant[data-state="streaming"]')
                               .get_attribute("data-chunks") or 0) >= 5)


# What the page does mid-reply runs in one script, which then clicks Stop: a long reply of the
# tiny model streams faster than the page renders it, and the page soon answers the driver's
# many round trips of a click or of typing too slowly.
STOP_AFTER = """
const s = document.getElementById('status'), msgs = () => document.querySelectorAll('article.msg').length;
const seen = {};
%s
document.getElementById('stop').click();
return seen;
"""


def test_after_a_reload_the_key_form_holds_the_saved_key(keyed_server: ServerProcess, open_page) -> None:
    """The form shows the key in use, so that "Use key" keeps it (it once showed an empty field,
    and "Use key" then deleted the saved key and locked the page out)."""
    page = open_page(keyed_server.base_url)
    wait(page, lambda d: d.find_element(By.ID, "key-form").is_displayed())
    use_key(page, "acme-key")
    page.refresh()
    ready(page)
    assert page.find_element(By.ID, "key-form").is_displayed()
    assert page.find_element(By.ID, "api-key").get_attribute("value") == "acme-key"
    page.find_element(By.CSS_SELECTOR, "#key-form button").click()
    ready(page)
    assert page.execute_script("return localStorage.getItem('hope.playground.apiKey')") == "acme-key"


def test_use_key_during_a_reply_keeps_the_turn(keyed_server: ServerProcess, open_page) -> None:
    """"Use key" while a reply streams would start the page over, and the turn would be lost from
    the transcript: the page refuses, and the turn stays, also after a reload."""
    page = open_page(keyed_server.base_url)
    wait(page, lambda d: d.find_element(By.ID, "key-form").is_displayed())
    use_key(page, "acme-key")
    deterministic(page)
    start_long_reply(page, "A turn in flight.")
    seen = page.execute_script(STOP_AFTER % """
      document.querySelector('#key-form button').click();
      seen.status = s.textContent;
      seen.streaming = document.querySelectorAll('article.msg[data-state="streaming"]').length;""")
    for _ in range(2):  # on the page, and in the transcript it keeps
        wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="stopped"]')) == 2)
        user = page.find_elements(By.CSS_SELECTOR, "article.msg.user")
        assert [u.find_element(By.CSS_SELECTOR, ".body").text for u in user] == ["A turn in flight."]
        page.refresh()
        ready(page)
    assert seen == {"status": "stop the reply or let it finish, then change the key", "streaming": 2}


def test_send_again_during_a_reply_keeps_the_draft(server: ServerProcess, open_page) -> None:
    page = open_page(server.base_url)
    ready(page)
    deterministic(page)
    send(page, FACT)
    start_long_reply(page, "Tell me a long story.")
    seen = page.execute_script(STOP_AFTER % """
      document.getElementById('input').value = 'a draft of the next message';
      document.querySelector('article.msg.user button.again').click();
      seen.draft = document.getElementById('input').value;
      seen.messages = msgs();""")
    assert seen == {"draft": "a draft of the next message", "messages": 4}  # and no turn was started
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'article.msg[data-state="stopped"]')) == 2)
    assert page.find_element(By.ID, "input").get_attribute("value") == "a draft of the next message"


def test_a_lost_connection_says_so(learner_checkpoint: Path, open_page, tmp_path: Path) -> None:
    """A server that cannot be reached is named as such, not by fetch's "Failed to fetch"."""
    server = ServerProcess(learner_checkpoint, "memory://", tmp_path / "server.log")
    try:
        page = open_page(server.base_url)
        ready(page)
        server.kill()
        page.find_element(By.ID, "refresh-sessions").click()
        wait(page, lambda d: d.find_element(By.ID, "status").text.startswith("lost the connection to the server"))
    finally:
        server.stop()
