#!/bin/bash
# Trimo runs this as root before the agent starts. The base image's is a no-op: project images
# override it (COPY preboot.sh /opt/trimo/preboot.sh) to start Postgres, Redis, ... and should wait
# until each service accepts connections. A non-zero exit stops the run before the agent starts.
set -euo pipefail
exit 0
