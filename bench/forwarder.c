/* The bare C forwarder of bench/relay.py: a relay's per-packet work and nothing else (no
 * TURN, no authentication, no permissions beyond one peer address), to show what the
 * machine and the kernel allow.
 *
 *   forwarder --transport udp|tcp|tls --port P --relays K --peer PORT [--cert F --key F]
 *
 * Clients reach it on 127.0.0.1:P (UDP, or a TCP/TLS listener); the first K distinct
 * clients (UDP source addresses, or accepted connections in order) each get a relay
 * socket of their own, as an allocation would.  A ChannelData message from client i loses
 * its 4-byte header and goes to 127.0.0.1:PORT from relay socket i; a datagram from that
 * peer to relay socket i gains the header (channel 0x4000, padded to 4 on a stream) and
 * goes to client i.  UDP moves in recvmmsg/sendmmsg batches.  It prints "ready" once
 * listening and runs until SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#ifdef WITH_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define MAX_CLIENTS 256
#define BATCH 64
#define BUF 2048
#define STREAM_BUF 65536
#define CHANNEL 0x4000

typedef struct {
    int known;
    struct sockaddr_in addr; /* UDP: the client's address */
    int fd;                  /* stream: the connection */
#ifdef WITH_TLS
    SSL *ssl;
#endif
    int relay;
    unsigned char in[STREAM_BUF];
    size_t in_len;
    unsigned char out[STREAM_BUF];
    size_t out_len;
} client_t;

static client_t *clients;
static int nclients, listen_fd, stream, tls, epfd;
static struct sockaddr_in peer;
static unsigned long long dropped;

static void die(const char *what) {
    fprintf(stderr, "forwarder: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int udp_socket(uint16_t port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0), size = 4 << 20;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    nonblocking(fd);
    return fd;
}

static int same_addr(const struct sockaddr_in *a, const struct sockaddr_in *b) {
    return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
}

/* ------------------------------------------------------------------ UDP clients */

static unsigned char bufs[BATCH][BUF + 4];

static int client_of(const struct sockaddr_in *from) {
    for (int i = 0; i < nclients; i++)
        if (clients[i].known && same_addr(&clients[i].addr, from)) return i;
    for (int i = 0; i < nclients; i++)
        if (!clients[i].known) {
            clients[i].known = 1;
            clients[i].addr = *from;
            return i;
        }
    return -1;
}

static void send_all(int fd, struct mmsghdr *msgs, int n) {
    int done = 0;
    while (done < n) {
        int k = sendmmsg(fd, msgs + done, n - done, MSG_DONTWAIT);
        if (k <= 0) break;
        done += k;
    }
    dropped += n - done;
}

/* ChannelData from UDP clients: strip the header, send from each client's relay socket. */
static void from_udp_clients(void) {
    struct mmsghdr in[BATCH], out[BATCH];
    struct iovec iov[BATCH], oiov[BATCH];
    struct sockaddr_in from[BATCH];
    int owner[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i] = (struct iovec){bufs[i], BUF};
            memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
            in[i].msg_hdr.msg_iov = &iov[i];
            in[i].msg_hdr.msg_iovlen = 1;
            in[i].msg_hdr.msg_name = &from[i];
            in[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(listen_fd, in, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        for (int i = 0; i < n; i++) {
            size_t len = in[i].msg_len;
            unsigned char *p = bufs[i];
            size_t body = len >= 4 ? ((size_t)p[2] << 8 | p[3]) : 0;
            owner[i] = (len >= 4 && (p[0] >> 6) == 1 && body + 4 <= len) ? client_of(&from[i]) : -1;
            oiov[i] = (struct iovec){p + 4, body};
        }
        for (int c = 0; c < nclients; c++) { /* one sendmmsg per relay socket */
            int m = 0;
            for (int i = 0; i < n; i++) {
                if (owner[i] != c) continue;
                memset(&out[m].msg_hdr, 0, sizeof out[m].msg_hdr);
                out[m].msg_hdr.msg_iov = &oiov[i];
                out[m].msg_hdr.msg_iovlen = 1;
                out[m].msg_hdr.msg_name = &peer;
                out[m].msg_hdr.msg_namelen = sizeof peer;
                m++;
            }
            if (m) send_all(clients[c].relay, out, m);
        }
        for (int i = 0; i < n; i++) dropped += owner[i] < 0;
        if (n < BATCH) return;
    }
}

/* ------------------------------------------------------------------ stream clients */

static ssize_t stream_read(client_t *c, void *buf, size_t len) {
#ifdef WITH_TLS
    if (tls) {
        int n = SSL_read(c->ssl, buf, (int)len);
        if (n > 0) return n;
        int e = SSL_get_error(c->ssl, n);
        errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : ECONNRESET;
        return e == SSL_ERROR_ZERO_RETURN ? 0 : -1;
    }
#endif
    return read(c->fd, buf, len);
}

static ssize_t stream_write(client_t *c, const void *buf, size_t len) {
#ifdef WITH_TLS
    if (tls) {
        int n = SSL_write(c->ssl, buf, (int)len);
        if (n > 0) return n;
        int e = SSL_get_error(c->ssl, n);
        errno = (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) ? EAGAIN : ECONNRESET;
        return -1;
    }
#endif
    return write(c->fd, buf, len);
}

static void flush(client_t *c) {
    while (c->out_len) {
        ssize_t n = stream_write(c, c->out, c->out_len);
        if (n <= 0) break;
        memmove(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
    struct epoll_event ev = {.events = EPOLLIN | (c->out_len ? EPOLLOUT : 0), .data.u32 = (uint32_t)(c - clients)};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void from_stream_client(client_t *c) {
    struct mmsghdr out[BATCH];
    struct iovec oiov[BATCH];
    for (;;) {
        ssize_t r = stream_read(c, c->in + c->in_len, sizeof c->in - c->in_len);
        if (r == 0 || (r < 0 && errno != EAGAIN)) {
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            return;
        }
        if (r < 0) break;
        c->in_len += r;
        size_t off = 0;
        int m = 0;
        while (c->in_len - off >= 4) {
            unsigned char *p = c->in + off;
            size_t len = (size_t)p[2] << 8 | p[3];
            size_t size = (p[0] >> 6) == 1 ? (4 + len + 3) & ~(size_t)3 : 20 + len;
            if (c->in_len - off < size) break;
            if ((p[0] >> 6) == 1) {
                oiov[m] = (struct iovec){p + 4, len};
                memset(&out[m].msg_hdr, 0, sizeof out[m].msg_hdr);
                out[m].msg_hdr.msg_iov = &oiov[m];
                out[m].msg_hdr.msg_iovlen = 1;
                out[m].msg_hdr.msg_name = &peer;
                out[m].msg_hdr.msg_namelen = sizeof peer;
                if (++m == BATCH) {
                    send_all(c->relay, out, m);
                    m = 0;
                }
            }
            off += size;
        }
        if (m) send_all(c->relay, out, m);
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
}

/* ------------------------------------------------------------------ from the peer */

static void from_peer(int index) {
    client_t *c = &clients[index];
    struct mmsghdr in[BATCH], out[BATCH];
    struct iovec iov[BATCH], oiov[BATCH];
    struct sockaddr_in from[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i] = (struct iovec){bufs[i] + 4, BUF};
            memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
            in[i].msg_hdr.msg_iov = &iov[i];
            in[i].msg_hdr.msg_iovlen = 1;
            in[i].msg_hdr.msg_name = &from[i];
            in[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(c->relay, in, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        int m = 0;
        for (int i = 0; i < n; i++) {
            if (!same_addr(&from[i], &peer)) { /* no permission */
                dropped++;
                continue;
            }
            size_t len = in[i].msg_len;
            unsigned char *p = bufs[i];
            p[0] = CHANNEL >> 8;
            p[1] = CHANNEL & 0xff;
            p[2] = len >> 8;
            p[3] = len & 0xff;
            if (stream) {
                size_t size = (4 + len + 3) & ~(size_t)3;
                if (c->out_len + size > sizeof c->out) {
                    dropped++;
                    continue;
                }
                memset(p + 4 + len, 0, size - 4 - len);
                memcpy(c->out + c->out_len, p, size);
                c->out_len += size;
                continue;
            }
            if (!c->known) {
                dropped++;
                continue;
            }
            oiov[m] = (struct iovec){p, 4 + len};
            memset(&out[m].msg_hdr, 0, sizeof out[m].msg_hdr);
            out[m].msg_hdr.msg_iov = &oiov[m];
            out[m].msg_hdr.msg_iovlen = 1;
            out[m].msg_hdr.msg_name = &c->addr;
            out[m].msg_hdr.msg_namelen = sizeof c->addr;
            m++;
        }
        if (stream) flush(c);
        else if (m) send_all(listen_fd, out, m);
        if (n < BATCH) return;
    }
}

/* ------------------------------------------------------------------ main */

#define LISTEN_TAG 0xffffffffu

int main(int argc, char **argv) {
    const char *transport = "udp", *cert = NULL, *key = NULL;
    int port = 0, peer_port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--transport")) transport = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--relays")) nclients = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--peer")) peer_port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cert")) cert = argv[i + 1];
        else if (!strcmp(argv[i], "--key")) key = argv[i + 1];
    }
    stream = strcmp(transport, "udp") != 0;
    tls = !strcmp(transport, "tls");
    if (!port || !peer_port || nclients < 1 || nclients > MAX_CLIENTS || (tls && (!cert || !key))) {
        fprintf(stderr, "usage: forwarder --transport udp|tcp|tls --port P --relays K --peer PORT [--cert F --key F]\n");
        return 2;
    }
#ifndef WITH_TLS
    if (tls) {
        fprintf(stderr, "forwarder: built without OpenSSL, tls unavailable\n");
        return 2;
    }
#else
    SSL_CTX *ctx = NULL;
    if (tls) {
        ctx = SSL_CTX_new(TLS_server_method());
        SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 || SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
            ERR_print_errors_fp(stderr);
            return 2;
        }
    }
#endif
    peer.sin_family = AF_INET;
    peer.sin_port = htons((uint16_t)peer_port);
    peer.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    clients = calloc(nclients, sizeof *clients);
    if (!clients) die("calloc");
    epfd = epoll_create1(0);
    for (int i = 0; i < nclients; i++) clients[i].relay = udp_socket(0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (stream) {
        int one = 1;
        listen_fd = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(listen_fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(listen_fd, 128) < 0) die("listen");
    } else {
        listen_fd = udp_socket((uint16_t)port);
    }
    printf("ready\n");
    fflush(stdout);
    if (stream) { /* accept the K clients, in order, before forwarding anything */
        for (int i = 0; i < nclients; i++) {
            client_t *c = &clients[i];
            int one = 1;
            c->fd = accept(listen_fd, NULL, NULL);
            if (c->fd < 0) die("accept");
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
#ifdef WITH_TLS
            if (tls) {
                c->ssl = SSL_new(ctx);
                SSL_set_fd(c->ssl, c->fd);
                if (SSL_accept(c->ssl) != 1) {
                    ERR_print_errors_fp(stderr);
                    return 2;
                }
            }
#endif
            nonblocking(c->fd);
            c->known = 1;
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        }
    } else {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = LISTEN_TAG};
        epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &ev);
    }
    for (int i = 0; i < nclients; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0x10000u + (uint32_t)i};
        epoll_ctl(epfd, EPOLL_CTL_ADD, clients[i].relay, &ev);
    }
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(epfd, events, 64, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            uint32_t tag = events[i].data.u32;
            if (tag == LISTEN_TAG) from_udp_clients();
            else if (tag >= 0x10000u) from_peer((int)(tag - 0x10000u));
            else {
                if (events[i].events & EPOLLOUT) flush(&clients[tag]);
                if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) from_stream_client(&clients[tag]);
            }
        }
#ifdef WITH_TLS
        for (int i = 0; tls && i < nclients; i++) /* decrypted bytes epoll will not signal */
            if (clients[i].ssl && SSL_pending(clients[i].ssl)) from_stream_client(&clients[i]);
#endif
    }
}
