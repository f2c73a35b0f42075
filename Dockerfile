# Trimo's own server image: `trimo serve` (webhook receiver + run pages) and `trimo worker`.
# A worker drives a Docker engine through its API; give it one, e.g. the host's socket:
#   docker run -v /var/run/docker.sock:/var/run/docker.sock -v trimo-data:/var/lib/trimo \
#     -e TRIMO_APP_ID=... -e TRIMO_PRIVATE_KEY_PATH=/run/secrets/key.pem -e TRIMO_WEBHOOK_SECRET=... \
#     -p 8000:8000 trimo/server
# Several workers and PostgreSQL: deploy/compose.yml and deploy/README.md.
ARG DEBIAN_IMAGE=debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# debootstrap: an engine that cannot pull debian:bookworm gets it made from Debian's archive.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv git ca-certificates tini debootstrap \
    && rm -rf /var/lib/apt/lists/*

# A network whose proxy presents its own CA (to PyPI here, to GitHub at run time): put its
# certificates, as .crt files, in deploy/extra-ca/ before building.
COPY deploy/extra-ca/ /usr/local/share/ca-certificates/trimo/
RUN update-ca-certificates >/dev/null
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

COPY pyproject.toml README.md /src/
COPY bot /src/bot
COPY webhooks /src/webhooks
COPY ui /src/ui
RUN python3 -m venv /opt/trimo/venv \
    && /opt/trimo/venv/bin/pip install --no-cache-dir --disable-pip-version-check "/src[postgres]" \
    && rm -rf /src

# The base image's context travels with the server, so it can build trimo/base:bookworm itself.
COPY images /opt/trimo/images
# What "Create GitHub App" on a fresh server's page asks GitHub for.
COPY config/github-app-manifest.json /opt/trimo/config/github-app-manifest.json

# The receiver needs no privilege: run it as `trimo` (`--user trimo`) when its workers run
# elsewhere. The default stays root: `trimo serve` starts a worker, which needs the engine's
# socket, and whoever holds that socket is root on the engine's host anyway (deploy/README.md).
RUN groupadd --system --gid 10001 trimo \
    && useradd --system --uid 10001 --gid trimo --home-dir /var/lib/trimo trimo \
    && install -d -o trimo -g trimo /var/lib/trimo /var/lib/trimo/workers
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
