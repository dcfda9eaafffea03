# One image: the signaling, the embedded STUN/TURN relay and the admin listener.
# The install and run steps are the README's own: `npm ci --prefix
# appliance/demo` (in a Node stage: the demo page's client libraries), `pip
# install '.[probe]'`, then `appliance serve`.  Configuration and certificates
# are volumes; with no /etc/appliance/appliance.yaml the container runs on the
# embedded defaults re-pointed at all interfaces by the environment below.
FROM node:20-bookworm-slim AS demo-libraries
WORKDIR /opt/appliance
COPY appliance/demo/package.json appliance/demo/package-lock.json ./appliance/demo/
RUN npm ci --prefix appliance/demo --no-audit --no-fund

FROM python:3.11-slim

RUN useradd --system --create-home --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
 && mkdir -p /etc/appliance/certs && chown -R appliance /etc/appliance

WORKDIR /opt/appliance
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY turn ./turn
COPY signaling ./signaling
COPY config ./config
COPY --from=demo-libraries /opt/appliance/appliance/demo/node_modules ./appliance/demo/node_modules
RUN pip install --no-cache-dir '.[probe]'

ENV APPLIANCE_CONFIG=/etc/appliance/appliance.yaml \
    APPLIANCE__DATA_DIR=/var/lib/appliance \
    APPLIANCE__TURN__UDP=0.0.0.0:3478 \
    APPLIANCE__TURN__TCP=0.0.0.0:3478 \
    APPLIANCE__TURN__TLS=0.0.0.0:5349 \
    APPLIANCE__HTTP__LISTEN=0.0.0.0:8443 \
    APPLIANCE__TURN__RELAY_IP=0.0.0.0 \
    APPLIANCE__TURN__RELAY_IP6=null
# Relay sockets bind every interface, so the address clients must use is not
# knowable here: start with `-e APPLIANCE__EXTERNAL_IP=<public IPv4>` (the
# appliance refuses to start without it, naming the key).

USER appliance
VOLUME ["/etc/appliance", "/var/lib/appliance"]
EXPOSE 3478/udp 3478/tcp 5349/tcp 8443/tcp

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["appliance", "healthcheck"]

CMD ["appliance", "serve"]
