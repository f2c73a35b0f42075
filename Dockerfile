# Trimo's own server image: `trimo serve` (webhook receiver + workers) on the embedded defaults.
# It drives the host's Docker engine: run it with the engine's socket, e.g.
#   docker run -v /var/run/docker.sock:/var/run/docker.sock -v trimo-data:/var/lib/trimo \
#     -e TRIMO_APP_ID=... -e TRIMO_PRIVATE_KEY_PATH=/run/secrets/key.pem -e TRIMO_WEBHOOK_SECRET=... \
#     -p 8000:8000 trimo/server
ARG DEBIAN_IMAGE=debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY bot /src/bot
COPY webhooks /src/webhooks
COPY ui /src/ui
RUN python3 -m venv /opt/trimo/venv \
    && /opt/trimo/venv/bin/pip install --no-cache-dir "/src[postgres]" \
    && rm -rf /src

# The base image's context travels with the server, so it can build trimo/base:bookworm itself.
COPY images /opt/trimo/images
# What "Create GitHub App" on a fresh server's page asks GitHub for.
COPY config/github-app-manifest.json /opt/trimo/config/github-app-manifest.json
ENV PATH=/opt/trimo/venv/bin:$PATH \
    TRIMO_IMAGES_DIR=/opt/trimo/images \
    TRIMO_APP_MANIFEST=/opt/trimo/config/github-app-manifest.json \
    TRIMO_DATA_DIR=/var/lib/trimo \
    TRIMO_HOST=0.0.0.0 \
    TRIMO_PORT=8000
VOLUME /var/lib/trimo
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['TRIMO_PORT'])"
ENTRYPOINT ["/usr/bin/tini", "--", "trimo"]
CMD ["serve"]
