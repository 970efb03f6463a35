"""A PNG of the Dagster UI's asset graph, taken with headless Chromium from a running server (`make ui`).

    python scripts/ui_screenshot.py                          # http://127.0.0.1:3000 -> ui-asset-graph.png
    python scripts/ui_screenshot.py --url http://127.0.0.1:3001 --out graph.png --dump-dom graph.html

The page is the global asset lineage (`/asset-groups`) with every group expanded (the `expanded` query parameter the
UI itself writes when a user opens the groups; the group names are read from the server's GraphQL API), so each
asset is a node with its name and status colour. The UI is a single-page app that loads the graph through GraphQL and
lays it out afterwards: Chromium's virtual-time budget (`--budget-ms`, page time in which the network is awaited)
lets it finish before the picture is taken, so the graph is drawn rather than the loading spinner. `--dump-dom`
writes the page's DOM at the same moment (the node names can be checked there).

On a fresh instance the UI opens a "Join the Dagster community" prompt over local pages; the script dismisses it
first as its Skip button does (the `setNuxSeen` mutation: a marker file under $DAGSTER_HOME/.nux), unless
--keep-prompt is given. `nux: {enabled: false}` in dagster.yaml turns the prompt off altogether.

Needs `chromium` (Debian: apt-get install chromium), `chromium-browser` or `google-chrome` on PATH, or --chromium.
Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# The id the UI gives a group in the global graph (groups are not split per code location by default).
GROUP_ID = "global@global:{}"


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def graphql(base: str, query: str, timeout: float = 30) -> dict:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=timeout).read())
    if answer.get("errors"):
        raise RuntimeError(f"GraphQL errors from {base}: {answer['errors']}")
    return answer["data"]


def graph_url(base: str, groups: list[str]) -> str:
    """The global asset graph with `groups` expanded."""
    expanded = ",".join(GROUP_ID.format(g) for g in sorted(groups))
    return f"{base}/asset-groups" + (f"?{urllib.parse.urlencode({'expanded': expanded})}" if groups else "")


def chromium_args(chromium: str, user_data_dir: str, width: int, height: int, budget_ms: int,
                  scale: float = 1.0) -> list[str]:
    args = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--mute-audio", "--no-first-run",
            "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}",
            f"--force-device-scale-factor={scale}", f"--virtual-time-budget={budget_ms}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return args


def screenshot(url: str, out: str, width: int = 1800, height: int = 1500, budget_ms: int = 20000,
               dump_dom: str | None = None, chromium: str | None = None, scale: float = 1.0,
               timeout_s: float = 180) -> None:
    """Write a PNG of `url` to `out` (and the DOM at that moment to `dump_dom`); raises RuntimeError with Chromium's
    output when it fails."""
    browser = find_chromium(chromium)
    if browser is None:
        raise RuntimeError(f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH); "
                           "install Chromium (Debian: apt-get install chromium) or pass --chromium")
    out = os.path.abspath(out)
    if os.path.exists(out):
        os.remove(out)
    with tempfile.TemporaryDirectory(prefix="synfer-chromium-") as profile:
        args = chromium_args(browser, profile, width, height, budget_ms, scale) + [f"--screenshot={out}"]
        if dump_dom:
            args.append("--dump-dom")  # printed on stdout after the same budget
        proc = subprocess.run(args + [url], capture_output=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) == 0:
        raise RuntimeError(f"{' '.join(args)} {url} exited with {proc.returncode} and wrote "
                           f"{'no' if not os.path.exists(out) else 'an empty'} screenshot:\n"
                           f"{proc.stderr.decode(errors='replace')[-3000:]}")
    if dump_dom:
        with open(dump_dom, "wb") as f:
            f.write(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running UI (default: make ui's)")
    parser.add_argument("--out", default="ui-asset-graph.png")
    parser.add_argument("--size", default="1800x1500", help="window size WIDTHxHEIGHT in CSS pixels")
    parser.add_argument("--scale", type=float, default=1.0, help="device scale factor (2: a sharper, 2x larger PNG)")
    parser.add_argument("--budget-ms", type=int, default=20000, help="page time before the picture (virtual time)")
    parser.add_argument("--dump-dom", default=None, metavar="FILE", help="also write the page's DOM to FILE")
    parser.add_argument("--keep-prompt", action="store_true", help="leave the community prompt as it is")
    parser.add_argument("--chromium", default=None, help="the browser binary (default: found on PATH)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    base = args.url.rstrip("/")
    try:
        groups = sorted({n["groupName"] for n in graphql(base, "{ assetNodes { groupName } }")["assetNodes"]})
        if not args.keep_prompt and graphql(base, "{ shouldShowNux }")["shouldShowNux"]:
            graphql(base, "mutation { setNuxSeen }")
            print("dismissed the UI's community prompt (as its Skip button does)")
    except OSError as e:
        print(f"no Dagster UI answers at {base} ({e}); start it with `make ui`", file=sys.stderr)
        return 1
    url = graph_url(base, groups)
    try:
        screenshot(url, args.out, width, height, args.budget_ms, args.dump_dom, args.chromium, args.scale)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {url} at {width}x{height}, groups {', '.join(groups)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
