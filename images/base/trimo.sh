# Environment for the agent and the tests. Trimo's runner switches to the `agent` user with a login
# shell, so what is exported here reaches both; Dockerfile ENV lines alone do not.
# Project images append to this file, e.g.:
#   RUN echo 'export DATABASE_URL="postgresql://app:app@localhost:5432/app_dev"' >> /etc/profile.d/trimo.sh
export TRIMO_CONTAINER=1
