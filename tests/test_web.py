"""The web page end to end: `python -m web` against a real worker on the tiny model, through its HTTP API as
a browser's script calls it, and in a real browser (Debian's Chromium, driven by Selenium) as a person uses
it. The browser test keeps a screenshot in test-artifacts/."""

from __future__ import annotations

import base64
import http.client
import http.cookiejar
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, ServiceProcess, free_port, free_worker, occupy_worker, png_size

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OPERATOR = ("operator", "correct horse")
SMALL = {"width": 64, "height": 64, "num_inference_steps": 3}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


class WebProcess(ServiceProcess):
    """`python -m web`, as an operator starts it."""

    label = "web"

    def __init__(self, settings, log_dir, **env: str) -> None:
        self.port = free_port()
        super().__init__(settings, "web", log_dir, {"WEB_PORT": str(self.port), **env})
        self.command = [sys.executable, "-m", "web"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/config", timeout=2):
                return True
        except OSError:
            return False


class Browser:
    """What a page's script does: JSON requests with the browser's cookie."""

    def __init__(self, base: str, credentials: tuple[str, str] | None = None) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.credentials = credentials

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if self.credentials:
            request.add_header(
                "Authorization", "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            )
        try:
            with self.opener.open(request, timeout=60) as response:
                status, raw = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def events(self, job_id: str) -> list[tuple[str, dict]]:
        """The job's server-sent events until its last."""
        with self.opener.open(f"{self.base}/api/jobs/{job_id}/events", timeout=120) as stream:
            events, kind = [], None
            for line in stream:
                text = line.decode().rstrip("\r\n")
                if text.startswith("event: "):
                    kind = text[len("event: ") :]
                elif text.startswith("data: ") and kind:
                    events.append((kind, json.loads(text[len("data: ") :])))
                    if kind in ("done", "failed", "cancelled"):
                        return events
        return events


@pytest.fixture(scope="module")
def web(shared_service, tmp_path_factory):
    settings, worker, _ = shared_service
    logs = tmp_path_factory.mktemp("web-logs")
    process = WebProcess(
        settings,
        logs,
        WEB_ADMIN_AUTH=":".join(OPERATOR),
        BROWSER_COOLDOWN_S="0",
        MAX_PENDING_PER_BROWSER="2",
    ).start()
    yield settings, worker, process
    process.stop()


def test_a_job_through_the_api_streams_its_progress_and_its_followups_work(web):
    _, _, process = web
    browser = Browser(process.url)
    status, config = browser.call("GET", "/api/config")
    assert status == 200 and "flickr30k" in config["adapters"] and config["aspects"]["16:9"] == [680, 384]
    assert {"photo", "cinematic"} <= {style["name"] for style in config["styles"]}

    status, job = browser.call("POST", "/api/jobs", {"options": {"prompt": "a dog", "seed": 5, **SMALL}})
    assert status == 200, job
    kinds = [kind for kind, _ in browser.events(job["job_id"])]
    assert kinds[0] == "queued" and "started" in kinds and "step" in kinds and kinds[-1] == "done"
    status, result = browser.call("GET", f"/api/jobs/{job['job_id']}/result")
    assert status == 200 and result["meta"]["seeds"] == [5]
    png = result["images"][0]["png"]
    assert browser.call("POST", f"/api/jobs/{job['job_id']}/delivered")[1] == {"confirmed": True}

    status, upscale = browser.call(
        "POST", f"/api/jobs/{job['job_id']}/followup", {"action": "upscale", "index": 0, "image": png}
    )
    assert status == 200, upscale
    assert browser.events(upscale["job_id"])[-1][0] == "done"
    upscaled = browser.call("GET", f"/api/jobs/{upscale['job_id']}/result")[1]
    assert png_size(base64.b64decode(upscaled["images"][0]["png"])) == (128, 128)
    assert upscaled["meta"]["seeds"] == [5] and upscaled["meta"]["strength"] == 0.3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps must be an integer from 1 to 100 (got 0)"),
        ({"prompt": "x", "image": base64.b64encode(b"not a picture").decode()}, "image is not a PNG, JPEG or WebP"),
        ({"prompt": "x", "style": "noir"}, "style 'noir' is not a style of this service"),
        ({"prompt": "a (dog"}, "prompt: the '(' at character 3 is never closed"),
        ({"prompt": "x", "colour": "red"}, "unknown option 'colour'"),
        ({"prompt": "x", "safety_checker": False}, "safety_checker cannot be set from the web page"),
    ],
)
def test_bad_options_are_refused_with_the_contracts_message(web, options, message):
    _, _, process = web
    status, answer = Browser(process.url).call("POST", "/api/jobs", {"options": options})
    assert status == 400 and message in answer["error"]


def test_per_browser_limits_cancel_rights_and_the_operators_login(web):
    settings, worker, process = web
    busy = occupy_worker(settings)
    try:
        owner, stranger = Browser(process.url), Browser(process.url)
        queued = [owner.call("POST", "/api/jobs", {"options": {"prompt": f"job {i}", **SMALL}}) for i in range(3)]
        assert [status for status, _ in queued] == [200, 200, 400]
        assert "You already have 2 jobs queued or rendering" in queued[2][1]["error"]
        first = queued[0][1]["job_id"]
        # Another browser can neither cancel it nor read it, nor let its result go.
        for method, path in (("POST", "cancel"), ("GET", "result"), ("POST", "delivered"), ("GET", "events")):
            assert stranger.call(method, f"/api/jobs/{first}/{path}", {} if method == "POST" else None)[0] == 404
        assert owner.call("POST", f"/api/jobs/{first}/cancel") == (200, {"outcome": "cancelled"})
    finally:
        free_worker(settings, busy)

    assert Browser(process.url).call("GET", "/api/admin/status")[0] == 401
    assert Browser(process.url, ("operator", "wrong")).call("GET", "/api/admin/status")[0] == 401
    status, tables = Browser(process.url, OPERATOR).call("GET", "/api/admin/status")
    assert status == 200 and "workers online:  1" in tables["queue"] and "flickr30k (default)" in tables["adapters"]
    status, reload = Browser(process.url, OPERATOR).call("POST", "/api/admin/reload", {"adapter": "flickr30k"})
    assert status == 200 and reload["ok"] and worker.name in reload["table"]


def test_oversized_bodies_and_followups_of_images_the_job_lacks_are_refused(web):
    _, _, process = web
    browser = Browser(process.url)
    # Refused by its declared length, before a byte of it is read (the answer comes while it would still send).
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.putrequest("POST", "/api/jobs")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10 * 2**20 * 4 // 3 + 128 * 1024))
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and "send a smaller image" in json.loads(answer.read())["error"]
    connection.close()
    status, job = browser.call("POST", "/api/jobs", {"options": {"prompt": "a dog", **SMALL}})
    assert browser.events(job["job_id"])[-1][0] == "done"
    for index in (1, -1, True):
        status, answer = browser.call(
            "POST", f"/api/jobs/{job['job_id']}/followup", {"action": "vary", "index": index}
        )
        assert status == 400 and "with the image's index (0 to 0)" in answer["error"]
    assert browser.call("GET", "/api/jobs/not-a-job/result")[0] == 404


def test_it_refuses_to_listen_beyond_loopback_without_a_login(web):
    _, _, process = web
    refused = subprocess.run(
        [sys.executable, "-m", "web"],
        env={**process.env, "WEB_HOST": "0.0.0.0", "WEB_PORT": str(free_port())},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "refusing to listen on 0.0.0.0 without a login" in refused.stderr


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_a_person_generates_in_a_real_browser_and_finds_it_in_the_gallery_after_a_reload(web, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings, _, process = web
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager: a path
    wait = WebDriverWait(driver, 60)
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        driver.get(process.url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        prompt = "a <b>lighthouse</b> & the sea"
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
        for field, value in (("steps", "3"), ("width", "64"), ("height", "64"), ("seed", "11")):
            driver.find_element(By.ID, field).send_keys(value)

        busy = occupy_worker(settings)  # the job waits its turn: its place in the queue shows
        driver.find_element(By.ID, "generate").click()
        status = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#running .card .status"))
        wait.until(lambda d: "Queued: position 1" in status.text)
        free_worker(settings, busy)

        image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery .card img.result"))
        card = driver.find_element(By.CSS_SELECTOR, "#gallery .card")
        assert card.find_element(By.CLASS_NAME, "prompt").text == prompt  # shown as typed, not as HTML
        assert not card.find_elements(By.CSS_SELECTOR, ".prompt b")
        assert "seed 11" in card.text and "64×64" in card.text
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        driver.save_screenshot(str(artifacts / "web-page.png"))

        driver.refresh()  # the gallery is this browser's: it survives a reload
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery .card img.result")) == 1

        bad = tmp_path / "notes.png"
        bad.write_bytes(b"a text file named like a picture")
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
        driver.find_element(By.ID, "prompt").send_keys("from a bad file")
        driver.find_element(By.ID, "image").send_keys(str(bad))
        driver.find_element(By.ID, "generate").click()
        error = driver.find_element(By.ID, "error")
        wait.until(lambda d: "image is not a PNG, JPEG or WebP file" in error.text)
        driver.save_screenshot(str(artifacts / "web-page-refusal.png"))
    finally:
        driver.quit()
