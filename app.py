"""Worldsim entry point: `python app.py` opens the browser UI (Gradio 6) on http://127.0.0.1:7860.

With no arguments it uses the embedded demo model (assets/demo; until it exists, the `debug` preset
with RANDOM weights: the pictures are noise), SQLite in ./data, and Redis when REDIS_URL is set.
Flags (environment variables in brackets): --host [WORLDSIM_HOST], --port [WORLDSIM_PORT],
--checkpoint [WORLDSIM_CHECKPOINT], --database-url [DATABASE_URL], --redis-url [REDIS_URL],
--device [WORLDSIM_DEVICE], --data-dir [WORLDSIM_DATA_DIR], and a few limits (`--help`).
Scripting without a browser: `python -m worldsim` (the engine's command line).
"""

import sys

from app.server import main

if __name__ == "__main__":
    sys.exit(main())
