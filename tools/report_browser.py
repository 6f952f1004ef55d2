#!/usr/bin/env python3
"""Loads a `runner report` page in headless Chromium and reports what a user would see.

    report_browser.py PAGE.html SCREENSHOT.png [--chromium PATH] [--select ID,ID,...]
                      [--filter TEXT] [--sort KEY]

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe), so nothing
but the Python standard library and Debian's `chromium` is needed. Prints one JSON object:

- errors: uncaught exceptions, console errors and failed loads while the page was used;
- requests: every URL the page asked for besides itself (a self-contained page asks for none);
- ready, run_ids (table order after load), count (the "N runs" text);
- sort: for KEY, the run ids in table order after one click and after a second one, and the
  header's aria-sort after each;
- filter: the ids still shown after typing TEXT, and the count text;
- selection: after ticking the --select runs, the run ids of the curve paths per chart, the
  phase lines, the config-difference keys, each run's confusion matrix, its thumbnails (how many,
  how many decoded), its captions;
- failed: the failed-runs list (run id and text);
- timings_ms: load, sort, filter, select (what the page took in this browser; informative);
- the screenshot (the whole page) is written to SCREENSHOT.png.
"""

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Browser:
    def __init__(self, chromium, profile):
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()

        def wire():
            # Chromium reads commands from fd 3 and writes to fd 4. Move both ends out of the
            # way first, so that neither dup2 closes the other.
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--window-size=1400,1000",
                "about:blank",
            ],
            preexec_fn=wire,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.events = []
        self.session = None

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome_r, 1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError("Chromium closed the DevTools pipe: " + err[-2000:])
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=True, timeout=60):
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method, timeout=60):
        deadline = time.time() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def js(self, expression):
        r = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}...: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        try:
            self.call("Browser.close", session=False, timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# What the table shows, in order.
TABLE_IDS = "[...document.querySelectorAll('#runs tbody tr')].filter(t => !t.hidden).map(t => t.dataset.run)"

SELECTION = r"""
(() => {
  const q = (s, root) => [...(root || document).querySelectorAll(s)];
  const charts = {};
  for (const s of q('#curves svg[data-chart]')) {
    charts[s.dataset.chart] = q('path[data-run]', s).map(p => p.dataset.run + ' ' + p.dataset.split);
  }
  const evaluations = {};
  for (const d of q('#evaluations .evaluation')) {
    evaluations[d.dataset.run] = {
      matrix: q('table.confusion tr', d).slice(1).map(tr => q('td', tr).map(td => Number(td.dataset.count))),
      classes: q('table.confusion tr:first-child th', d).slice(1).map(th => th.textContent),
      thumbnails: q('.misclassified figure', d).length,
      decoded: q('.misclassified img', d).filter(i => i.complete && i.naturalWidth > 0).length,
      captions: q('.misclassified figcaption', d).map(c => c.textContent),
    };
  }
  return {
    selected: q('#runs tbody tr.selected').map(t => t.dataset.run),
    charts,
    phase_lines: q('#curves svg[data-chart=acc] line.phase').map(l => l.dataset.phase),
    diff_keys: q('#config-diff-table tr[data-key]').map(t => t.dataset.key),
    config_keys: q('#config-table tr[data-key]').length,
    diff_note: (document.querySelector('#config-diff p') || {}).textContent || '',
    evaluations,
    note: document.getElementById('selection-note').textContent,
    hash: location.hash,
  };
})()
"""


def timed(b, expression):
    """Runs `expression` in the page and waits two frames, so the time includes the layout."""
    return b.js(
        "(async () => { const t = performance.now(); "
        + expression
        + "; await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));"
        " return performance.now() - t; })()"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("page")
    ap.add_argument("screenshot")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--select", default="")
    ap.add_argument("--filter", default="")
    ap.add_argument("--sort", default="best_val_acc")
    ap.add_argument("--max-height", type=int, default=6000, help="of the screenshot, in pixels")
    ap.add_argument("--hash", default="", help="the address's #fragment, e.g. runs=ID,ID")
    args = ap.parse_args()
    page = Path(args.page).resolve()
    url = page.as_uri() + ("#" + args.hash if args.hash else "")
    profile = tempfile.mkdtemp(prefix="runner-chromium-")
    b = Browser(args.chromium, profile)
    out = {}
    try:
        b.call("Target.setDiscoverTargets", {"discover": True}, session=False)
        target = b.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        b.session = b.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.call(domain + ".enable")
        b.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        t0 = time.time()
        b.call("Page.navigate", {"url": url})
        b.wait_event("Page.loadEventFired", timeout=120)
        out["timings_ms"] = {"load": round((time.time() - t0) * 1000, 1)}
        out["ready"] = b.js("document.body.dataset.ready === 'true'")
        out["title"] = b.js("document.title")
        out["run_ids"] = b.js(TABLE_IDS)
        out["count"] = b.js("document.getElementById('run-count').textContent")
        out["initial_selection"] = b.js(SELECTION)
        key = json.dumps(args.sort)
        click = f"document.querySelector('#runs th[data-key=' + {json.dumps(key)} + ']').click()"
        sort = {"key": args.sort}
        out["timings_ms"]["sort"] = round(timed(b, click), 1)
        sort["first"] = b.js(TABLE_IDS)
        sort["first_aria"] = b.js(f"document.querySelector('#runs th[data-key=' + {json.dumps(key)} + ']').getAttribute('aria-sort')")
        b.js(click)
        sort["second"] = b.js(TABLE_IDS)
        sort["second_aria"] = b.js(f"document.querySelector('#runs th[data-key=' + {json.dumps(key)} + ']').getAttribute('aria-sort')")
        out["sort"] = sort
        if args.filter:
            typed = (
                "const f = document.getElementById('filter'); f.value = "
                + json.dumps(args.filter)
                + "; f.dispatchEvent(new Event('input'))"
            )
            out["timings_ms"]["filter"] = round(timed(b, typed), 1)
            out["filter"] = {
                "text": args.filter,
                "shown": b.js(TABLE_IDS),
                "count": b.js("document.getElementById('run-count').textContent"),
            }
            b.js("const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'))")
        if args.select:
            ids = [i for i in args.select.split(",") if i]
            # Untick what is ticked, then tick the runs asked for, as a user clicks.
            ticks = (
                "for (const b of document.querySelectorAll('#runs tbody tr.selected input')) b.click();"
                + "".join(
                    f"document.querySelector('#runs tbody tr[data-run=' + {json.dumps(json.dumps(i))} + '] input').click();"
                    for i in ids
                )
            )
            out["timings_ms"]["select"] = round(timed(b, ticks), 1)
            # Thumbnails are data URLs; give them a moment to decode.
            b.js(
                "Promise.race([Promise.all([...document.images].map(i => i.decode().catch(() => null))),"
                " new Promise(r => setTimeout(r, 10000))])"
            )
            out["selection"] = b.js(SELECTION)
        out["failed"] = b.js(
            "[...document.querySelectorAll('#failed li')].map(li => ({run: li.dataset.run, text: li.textContent}))"
        )
        out["notes"] = b.js("[...document.querySelectorAll('#notes li')].map(li => li.textContent)")
        metrics = b.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = b.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1400, "height": min(size["height"], args.max_height), "scale": 1},
            },
        )
        Path(args.screenshot).write_bytes(base64.b64decode(shot["data"]))
        # Whatever arrived while the page was used.
        b.js("0")
        errors, requests = [], []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append("log: " + p["entry"]["text"])
            elif m == "Network.requestWillBeSent":
                u = p["request"]["url"]
                if u.split("#")[0] != url.split("#")[0] and not u.startswith("data:"):
                    requests.append(u)
            elif m == "Network.loadingFailed":
                errors.append("load failed: " + p.get("errorText", ""))
        out["errors"] = errors
        out["requests"] = requests
    finally:
        b.close()
        shutil.rmtree(profile, ignore_errors=True)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
