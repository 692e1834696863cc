#!/usr/bin/env python3
"""Drives headless Chromium over the DevTools protocol (on a pipe, so no
websocket library is needed; stdlib only) for scripts/browser-check.sh:
opens URL, watches the page until it has rendered EXPECT grid images (noting
whether its progress bar was seen part-way), checks every image decoded,
reads the consistency figures shown beside the grid's rows, and writes a
PNG screenshot.

  python3 scripts/browser_cdp.py URL EXPECT SCREENSHOT.png
Prints one JSON line of what it saw; exits 1 with a sentence when the page failed.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-pipe"]


class Browser:
    def __init__(self):
        # Chromium reads commands from fd 3 and writes replies to fd 4.
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        profile = tempfile.mkdtemp(prefix="sdtune-chromium-")
        def fds():
            # Via fresh copies, in case a pipe end already sits on 3 or 4.
            r, w = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(r, 3)
            os.dup2(w, 4)
        # 3 and 4 are kept open in the child by listing them.
        self.proc = subprocess.Popen(["chromium", *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4, to_browser_r, from_browser_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.next_id = 0
        self.buffer = b""

    def send(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise SystemExit("browser-check: chromium closed its DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise SystemExit(f"browser-check: {method} failed: {reply['error']}")
                return reply["result"]

    def close(self):
        try:
            self.send("Browser.close")
        except SystemExit:
            pass
        self.proc.wait(timeout=10)


def main():
    url, expect, shot = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    b = Browser()
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        b.send("Page.enable", session=s)
        b.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 720, "deviceScaleFactor": 1, "mobile": False}, session=s)
        b.send("Page.navigate", {"url": url}, session=s)
        probe = ("JSON.stringify({r: document.body ? (document.body.dataset.rendered || '') : '',"
                 " v: document.getElementById('bar') ? document.getElementById('bar').value : 0,"
                 " m: document.getElementById('bar') ? document.getElementById('bar').max : 1,"
                 " s: document.getElementById('status') ? document.getElementById('status').textContent : '',"
                 " e: document.getElementById('error') ? document.getElementById('error').textContent : ''})")
        seen_partway, state, deadline = False, {}, time.time() + 120
        while time.time() < deadline:
            state = json.loads(b.send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=s)["result"]["value"])
            seen_partway |= 0 < state["v"] < state["m"]
            if state["e"]:
                raise SystemExit(f"browser-check: the page shows an error: {state['e']}")
            if state["r"] == str(expect):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"browser-check: the page did not render {expect} images in 120 s (last seen: {state})")
        cells = b.send("Runtime.evaluate", {"expression":
            "JSON.stringify([...document.querySelectorAll('img.cell')].map(i => [i.naturalWidth, i.src.slice(0, 5)]))",
            "returnByValue": True}, session=s)["result"]["value"]
        cells = json.loads(cells)
        if len(cells) != expect or any(w == 0 or src != "blob:" for w, src in cells):
            raise SystemExit(f"browser-check: the grid should hold {expect} decoded images, it holds {cells}")
        figures = json.loads(b.send("Runtime.evaluate", {"expression":
            "JSON.stringify([...document.querySelectorAll('td.figures')].map(t => t.innerText.replace(/\\s+/g, ' ').trim()))",
            "returnByValue": True}, session=s)["result"]["value"])
        png = base64.b64decode(b.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"])
        with open(shot, "wb") as f:
            f.write(png)
        print(json.dumps({"images": len(cells), "progress_seen_partway": seen_partway, "status": state["s"], "figures": figures, "screenshot_bytes": len(png)}))
    finally:
        b.close()


if __name__ == "__main__":
    main()
