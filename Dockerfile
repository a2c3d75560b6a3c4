# deltagw — the DeltaStream API gateway as a container image.
#
#   docker build -t deltagw .
#   docker run --rm -p 8000:8000 -e AUTH_SERVICE_URL=http://auth:8001 deltagw
#
# Two stages: the build stage fills a virtualenv, the runtime stage copies only
# that venv (no source tree, no build leftovers) and runs as a non-root user.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/deltagw/venv
ENV PATH=/opt/deltagw/venv/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer, so that a code change does not
# reinstall them. setup.py's install_requires is the single list: it is read
# by running setup.py with setuptools.setup replaced by a printer (setup.py
# only needs itself for that), so there is no requirements.txt to drift; the
# versions are the exact ones constraints.txt pins, which CI tests.
COPY setup.py pyproject.toml constraints.txt ./
RUN python -c "import runpy, setuptools; setuptools.setup = lambda **kw: print('\n'.join(kw['install_requires'])); runpy.run_path('setup.py')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt

# Then the code; its dependencies are already there.
COPY deltagw ./deltagw
COPY twisted ./twisted
RUN pip install --no-cache-dir --no-deps .


FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/deltagw/venv/bin:$PATH \
    XDG_STATE_HOME=/var/lib

COPY --from=build /opt/deltagw/venv /opt/deltagw/venv

# Regenerate Twisted's plugin cache (dropin.cache) while still root: the
# non-root user cannot write into the venv, and a stale or missing cache makes
# every start rescan the plugins and warn.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# A fixed uid so volume permissions are predictable; the demo (--demo) keeps
# its state in $XDG_STATE_HOME/deltagw = /var/lib/deltagw.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin deltagw \
    && install -d -o deltagw -g deltagw -m 0700 /var/lib/deltagw
USER 10001:10001
WORKDIR /var/lib/deltagw

EXPOSE 8000

# Python's urllib, since the slim image has no curl. It assumes the default
# PORT=8000; urlopen raises (exit 1, unhealthy) on a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# --nodaemon: the container's lifetime is the process's; --pidfile= (empty):
# no pid file, so a restarted container never finds a stale one ("Another
# twistd server is running, PID 1").
CMD ["twistd", "--nodaemon", "--pidfile=", "deltagw"]
