"""Container health check: exit 0 when the server's /readyz answers 200 (no curl needed)."""

import os
import sys
import urllib.request

port = os.environ.get("AVATAR_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as error:  # refused, timed out, or an HTTP error status (503 while warming up)
    sys.stderr.write(f"readyz: {error}\n")
    sys.exit(1)
