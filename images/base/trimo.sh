# Environment for the agent and the tests. Trimo's runner switches to the `agent` user with a login
# shell, so what is exported here reaches both; Dockerfile ENV lines alone do not.
# Project images append to this file, e.g.:
#   RUN echo 'export DATABASE_URL="postgresql://app:app@localhost:5432/app_dev"' >> /etc/profile.d/trimo.sh
export TRIMO_CONTAINER=1
# The system bundle holds Debian's CAs plus the server's extra_ca_certs; these tools do not all
# read it by default (Node keeps its own list, pip and requests their certifi copy).
export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
export REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
