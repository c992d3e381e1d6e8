"""Download a source distribution from the package index's simple page (PEP 503), without running
its setup.py: ``fetch_sdist.py NAME VERSION SHA256 DEST_DIR``. The index is pip's (PIP_INDEX_URL
or ``pip config``), else PyPI; the file must have the given sha256. Used by install.sh where
``pip download`` cannot prepare the sdist's metadata (MinkowskiEngine 0.5.4 on Python >= 3.12)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        url = got.stdout.strip() if got.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def main() -> None:
    name, version, sha256, dest = sys.argv[1:5]
    page_url = f"{index_url()}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    wanted = f"{name}-{version}.tar.gz"
    for href in re.findall(r'href="([^"]+)"', page):
        if urllib.parse.unquote(href.split("#")[0]).rsplit("/", 1)[-1].lower() == wanted.lower():
            data = urllib.request.urlopen(urllib.parse.urljoin(page_url, href), timeout=300).read()
            if hashlib.sha256(data).hexdigest() != sha256:
                sys.exit(f"[install] error: {wanted} from {page_url} does not have sha256 {sha256}")
            with open(os.path.join(dest, wanted), "wb") as f:
                f.write(data)
            return
    sys.exit(f"[install] error: {wanted} is not listed on {page_url}")


if __name__ == "__main__":
    main()
