/* The load generator and sink of bench/relay.py: paced ChannelData through a relay, one
 * direction at a time, on sockets the harness set up and handed over.
 *
 *   loadgen --payload N --peer FD --clients FD,FD,... [--stream] [--tls --bridges FD,FD,...]
 *
 * --clients are sockets connected to the relay, one per allocation: UDP (--stream absent),
 * TCP (--stream), or TCP not yet TLS (--tls: this program runs the TLS 1.3 handshakes and,
 * until its first command, bridges each connection's plaintext to the matching --bridges
 * socket, so the harness can run the TURN set-up in Python over it).  --peer is one UDP
 * socket, the peer every allocation has a channel to.
 *
 * Commands on stdin, one per line; each step answers with one JSON line on stdout:
 *   relays IP:PORT IP:PORT ...     the relayed address of each client, in --clients order
 *   step c2p|p2c RATE SECONDS DRAIN
 *       c2p: ChannelData from the clients (round robin), counted at the peer;
 *       p2c: UDP from the peer to each relayed address, counted at the clients.
 *       RATE packets/s in all, paced in batches (sendmmsg for UDP, one write per connection
 *       for streams), for SECONDS, then DRAIN seconds more (or until all arrived) to count.
 *   quit
 * Each payload carries the step number, the client index and CLOCK_MONOTONIC at sending,
 * so a packet from an earlier step is not counted and the one-way latency through the
 * relay is the receive time minus that stamp (same host, same clock).  A packet the
 * kernel would not take at once (UDP EAGAIN, a stream's buffer full) is not retried but
 * counted as unsent: pacing stays honest and the harness sees the server push back.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#ifdef WITH_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define MAX_CONNS 256
#define BATCH 64          /* messages per sendmmsg / recvmmsg call */
#define MAX_PER_ROUND 4096 /* packets sent per pacing round at most */
#define BUF 2048
#define STREAM_OUT 262144 /* bytes buffered per stream connection: a short stall is not pushback */
#define STREAM_IN 65536
#define HIST_US 1000000 /* latency histogram: 1 us buckets up to 1 s */
#define STAMP 16
#define CHANNEL 0x4000

typedef struct {
    int fd;
    int bridge;
#ifdef WITH_TLS
    SSL *ssl;
#endif
    struct sockaddr_in relay;
    unsigned char in[STREAM_IN];
    size_t in_len;
    unsigned char out[STREAM_OUT];
    size_t out_len;
} conn_t;

static conn_t *conns;
static int nconns, peer_fd, stream, tls, payload;
static uint32_t step_id;
static uint64_t received, sent, unsent;
static uint32_t *hist;
static uint64_t hist_over;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec;
}

static double cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void stamp(unsigned char *p, uint32_t index, uint64_t ts) {
    memcpy(p, &step_id, 4);
    memcpy(p + 4, &index, 4);
    memcpy(p + 8, &ts, 8);
}

/* One payload arrived (UDP at the peer, or a ChannelData's body at a client). */
static void count(const unsigned char *p, size_t len, uint64_t at) {
    uint32_t id;
    uint64_t ts;
    if (len < STAMP) return;
    memcpy(&id, p, 4);
    if (id != step_id) return; /* from an earlier step, or not ours */
    memcpy(&ts, p + 8, 8);
    received++;
    uint64_t us = at > ts ? (at - ts) / 1000 : 0;
    if (us < HIST_US) hist[us]++;
    else hist_over++;
}

static uint64_t percentile(double q) {
    uint64_t total = received, seen = 0, want = (uint64_t)(q * total);
    if (!total) return 0;
    for (uint64_t us = 0; us < HIST_US; us++) {
        seen += hist[us];
        if (seen > want) return us;
    }
    return HIST_US;
}

static void nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ------------------------------------------------------------------ stream I/O */

static ssize_t stream_read(conn_t *c, void *buf, size_t len) {
#ifdef WITH_TLS
    if (tls) {
        int n = SSL_read(c->ssl, buf, (int)len);
        if (n > 0) return n;
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            errno = EAGAIN;
            return -1;
        }
        errno = ECONNRESET;
        return n == 0 ? 0 : -1;
    }
#endif
    return read(c->fd, buf, len);
}

static ssize_t stream_write(conn_t *c, const void *buf, size_t len) {
#ifdef WITH_TLS
    if (tls) {
        int n = SSL_write(c->ssl, buf, (int)len);
        if (n > 0) return n;
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            errno = EAGAIN;
            return -1;
        }
        errno = ECONNRESET;
        return -1;
    }
#endif
    return write(c->fd, buf, len);
}

static void flush(conn_t *c) {
    while (c->out_len) {
        ssize_t n = stream_write(c, c->out, c->out_len);
        if (n <= 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            die("stream write");
        }
        memmove(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
}

/* Frames in a connection's input: ChannelData (padded to 4 on a stream) is counted, STUN
 * messages (a refresh answer, say) are skipped. */
static void parse_frames(conn_t *c, uint64_t at) {
    size_t off = 0;
    while (c->in_len - off >= 4) {
        unsigned char *p = c->in + off;
        size_t len = ((size_t)p[2] << 8) | p[3], size;
        if ((p[0] >> 6) == 1) size = (4 + len + 3) & ~(size_t)3;
        else size = 20 + len;
        if (c->in_len - off < size) break;
        if ((p[0] >> 6) == 1) count(p + 4, len, at);
        off += size;
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
}

static void read_stream(conn_t *c) {
    for (;;) {
        ssize_t n = stream_read(c, c->in + c->in_len, sizeof c->in - c->in_len);
        if (n == 0) {
            fprintf(stderr, "loadgen: the relay closed a connection\n");
            exit(3);
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            die("stream read");
        }
        c->in_len += n;
        parse_frames(c, now_ns());
    }
}

/* ------------------------------------------------------------------ UDP I/O */

static unsigned char rbufs[BATCH][BUF];

static void read_udp(int fd, size_t skip) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = rbufs[i];
            iov[i].iov_len = BUF;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNREFUSED) die("recvmmsg");
            return;
        }
        uint64_t at = now_ns();
        for (int i = 0; i < n; i++) {
            size_t len = msgs[i].msg_len;
            if (len > skip && (!skip || (rbufs[i][0] >> 6) == 1)) count(rbufs[i] + skip, len - skip, at);
        }
        if (n < BATCH) return;
    }
}

/* Both ends, whichever the direction: what a server still forwards from an earlier step
 * is read (and not counted, by its step number) rather than left to fill a buffer. */
static void receive_all(void) {
    read_udp(peer_fd, 0);
    for (int i = 0; i < nconns; i++) {
        if (stream) read_stream(&conns[i]);
        else read_udp(conns[i].fd, 4);
    }
}

/* ------------------------------------------------------------------ sending */

static unsigned char sbufs[MAX_PER_ROUND][BUF];

/* sendmmsg all of msgs[0..n) on fd; what the kernel will not take now is unsent. */
static void send_batch(int fd, struct mmsghdr *msgs, int n) {
    int done = 0;
    while (done < n) {
        int chunk = n - done > BATCH ? BATCH : n - done;
        int k = sendmmsg(fd, msgs + done, chunk, MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS || errno == ECONNREFUSED) break;
            die("sendmmsg");
        }
        done += k;
        if (k < chunk) break;
    }
    sent += done;
    unsent += n - done;
}

static uint64_t rr;

static void send_round(int dir_p2c, int n) {
    static struct mmsghdr msgs[MAX_PER_ROUND];
    static struct iovec iov[MAX_PER_ROUND];
    uint64_t ts = now_ns();
    if (dir_p2c) { /* the peer, to every relayed address in turn */
        for (int i = 0; i < n; i++) {
            uint32_t index = (uint32_t)(rr++ % nconns);
            stamp(sbufs[i], index, ts);
            iov[i].iov_base = sbufs[i];
            iov[i].iov_len = payload;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &conns[index].relay;
            msgs[i].msg_hdr.msg_namelen = sizeof conns[index].relay;
        }
        send_batch(peer_fd, msgs, n);
        return;
    }
    size_t frame = stream ? (4 + payload + 3) & ~(size_t)3 : 4 + (size_t)payload;
    if (stream) {
        unsigned char buf[BUF];
        memset(buf, 0, sizeof buf);
        buf[0] = CHANNEL >> 8;
        buf[1] = CHANNEL & 0xff;
        buf[2] = payload >> 8;
        buf[3] = payload & 0xff;
        for (int i = 0; i < n; i++) {
            uint32_t index = (uint32_t)(rr++ % nconns);
            conn_t *c = &conns[index];
            if (c->out_len + frame > sizeof c->out) {
                unsent++;
                continue;
            }
            stamp(buf + 4, index, ts);
            memcpy(c->out + c->out_len, buf, frame);
            c->out_len += frame;
            sent++;
        }
        for (int i = 0; i < nconns; i++) flush(&conns[i]);
        return;
    }
    /* UDP clients: group the round's packets by client, one sendmmsg each */
    int per = n / nconns, extra = n % nconns, at = 0;
    uint64_t first = rr;
    rr += n;
    for (int k = 0; k < nconns; k++) {
        uint32_t index = (uint32_t)((first + k) % nconns);
        int m = per + (k < extra);
        for (int i = 0; i < m; i++) {
            unsigned char *p = sbufs[at + i];
            p[0] = CHANNEL >> 8;
            p[1] = CHANNEL & 0xff;
            p[2] = payload >> 8;
            p[3] = payload & 0xff;
            stamp(p + 4, index, ts);
            iov[at + i].iov_base = p;
            iov[at + i].iov_len = frame;
            memset(&msgs[at + i].msg_hdr, 0, sizeof msgs[at + i].msg_hdr);
            msgs[at + i].msg_hdr.msg_iov = &iov[at + i];
            msgs[at + i].msg_hdr.msg_iovlen = 1;
        }
        send_batch(conns[index].fd, msgs + at, m);
        at += m;
    }
}

static int pending_out(void) {
    if (!stream) return 0;
    for (int i = 0; i < nconns; i++)
        if (conns[i].out_len) return 1;
    return 0;
}

static void wait_for_io(double seconds) {
    struct pollfd fds[MAX_CONNS + 1];
    int n = 0;
    fds[n++] = (struct pollfd){.fd = peer_fd, .events = POLLIN};
    for (int i = 0; i < nconns; i++) {
        short ev = POLLIN;
        if (stream && conns[i].out_len) ev |= POLLOUT;
        fds[n++] = (struct pollfd){.fd = conns[i].fd, .events = ev};
    }
#ifdef WITH_TLS
    if (tls) /* SSL may hold decrypted bytes the socket no longer signals */
        for (int i = 0; i < nconns; i++)
            if (SSL_pending(conns[i].ssl)) seconds = 0;
#endif
    struct timespec t = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    ppoll(fds, n, &t, NULL);
}

static void run_step(int dir_p2c, double rate, double seconds, double drain) {
    step_id++;
    received = sent = unsent = 0;
    hist_over = 0;
    memset(hist, 0, HIST_US * sizeof *hist);
    double cpu0 = cpu_s(), t0 = now_s(), end = t0 + seconds, now;
    while ((now = now_s()) < end) {
        uint64_t due = (uint64_t)((now - t0) * rate);
        uint64_t n = due - (sent + unsent);
        if (n > MAX_PER_ROUND) n = MAX_PER_ROUND;
        if (n) send_round(dir_p2c, (int)n);
        else if (stream)
            for (int i = 0; i < nconns; i++) flush(&conns[i]);
        receive_all();
        double next = t0 + (sent + unsent + 1) / rate - now_s();
        if (next < 50e-6) next = 50e-6; /* a round every 50 us at most: batches at high rates */
        if (next > 0.01) next = 0.01;
        wait_for_io(next);
    }
    double sending = now_s() - t0, stop = now_s() + drain;
    while (received < sent && now_s() < stop) {
        for (int i = 0; stream && i < nconns; i++) flush(&conns[i]);
        receive_all();
        if (received < sent) wait_for_io(0.005);
    }
    printf("{\"dir\": \"%s\", \"offered\": %.0f, \"seconds\": %.4f, \"sent\": %llu, \"unsent\": %llu, "
           "\"received\": %llu, \"p50_us\": %llu, \"p99_us\": %llu, \"over_1s\": %llu, "
           "\"pending_bytes\": %d, \"load_cpu_s\": %.4f}\n",
           dir_p2c ? "p2c" : "c2p", rate, sending, (unsigned long long)sent, (unsigned long long)unsent,
           (unsigned long long)received, (unsigned long long)percentile(0.5),
           (unsigned long long)percentile(0.99), (unsigned long long)hist_over, pending_out(),
           cpu_s() - cpu0);
    fflush(stdout);
}

/* ------------------------------------------------------------------ TLS set-up */

#ifdef WITH_TLS
static void tls_handshakes(void) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL); /* the servers' development certificate */
    static const unsigned char alpn[] = "\x09stun.turn";
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn - 1);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    for (int i = 0; i < nconns; i++) {
        conns[i].ssl = SSL_new(ctx);
        SSL_set_fd(conns[i].ssl, conns[i].fd);
        SSL_set_connect_state(conns[i].ssl);
    }
    int left = nconns;
    char done[MAX_CONNS] = {0};
    double deadline = now_s() + 15;
    while (left) { /* all at once: a server may take them in any order */
        struct pollfd fds[MAX_CONNS];
        int n = 0;
        for (int i = 0; i < nconns; i++) {
            if (done[i]) continue;
            int r = SSL_do_handshake(conns[i].ssl);
            if (r == 1) {
                done[i] = 1;
                left--;
                continue;
            }
            int e = SSL_get_error(conns[i].ssl, r);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                ERR_print_errors_fp(stderr);
                fprintf(stderr, "loadgen: TLS handshake %d failed\n", i);
                exit(2);
            }
            fds[n++] = (struct pollfd){.fd = conns[i].fd, .events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT};
        }
        if (now_s() > deadline) {
            fprintf(stderr, "loadgen: TLS handshakes timed out\n");
            exit(2);
        }
        if (n) poll(fds, n, 100);
    }
}

/* Plaintext between each TLS connection and its bridge socket until stdin has a line. */
static void bridge(void) {
    struct pollfd fds[2 * MAX_CONNS + 1];
    unsigned char buf[16384];
    for (;;) {
        int n = 0, ready = 0;
        fds[n++] = (struct pollfd){.fd = 0, .events = POLLIN};
        for (int i = 0; i < nconns; i++) {
            fds[n++] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
            fds[n++] = (struct pollfd){.fd = conns[i].bridge, .events = POLLIN};
            if (SSL_pending(conns[i].ssl)) ready = 1;
        }
        poll(fds, n, ready ? 0 : 200);
        if (fds[0].revents) return;
        for (int i = 0; i < nconns; i++) {
            conn_t *c = &conns[i];
            ssize_t r;
            if (fds[1 + 2 * i + 1].revents) {
                r = read(c->bridge, buf, sizeof buf);
                if (r > 0) {
                    size_t off = 0;
                    while (off < (size_t)r) { /* set-up messages: small, wait for them to go */
                        ssize_t w = stream_write(c, buf + off, r - off);
                        if (w > 0) off += w;
                        else if (errno == EAGAIN) poll(&(struct pollfd){.fd = c->fd, .events = POLLOUT}, 1, 100);
                        else die("bridge to TLS");
                    }
                }
            }
            while ((r = stream_read(c, buf, sizeof buf)) > 0)
                if (write(c->bridge, buf, r) != r) die("bridge from TLS");
            if (r == 0) {
                fprintf(stderr, "loadgen: the relay closed a connection during set-up\n");
                exit(3);
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------ main */

static int parse_fds(char *list, int *out) {
    int n = 0;
    for (char *tok = strtok(list, ","); tok && n < MAX_CONNS; tok = strtok(NULL, ",")) out[n++] = atoi(tok);
    return n;
}

int main(int argc, char **argv) {
    int client_fds[MAX_CONNS], bridge_fds[MAX_CONNS], nbridges = 0;
    peer_fd = -1;
    payload = 160;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--payload") && i + 1 < argc) payload = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--peer") && i + 1 < argc) peer_fd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--clients") && i + 1 < argc) nconns = parse_fds(argv[++i], client_fds);
        else if (!strcmp(argv[i], "--bridges") && i + 1 < argc) nbridges = parse_fds(argv[++i], bridge_fds);
        else if (!strcmp(argv[i], "--stream")) stream = 1;
        else if (!strcmp(argv[i], "--tls")) tls = stream = 1;
        else {
            fprintf(stderr, "loadgen: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (peer_fd < 0 || nconns < 1 || payload < STAMP || payload > BUF - 8 || (tls && nbridges != nconns)) {
        fprintf(stderr, "usage: loadgen --payload N --peer FD --clients FD,... [--stream] [--tls --bridges FD,...]\n");
        return 2;
    }
#ifndef WITH_TLS
    if (tls) {
        fprintf(stderr, "loadgen: built without OpenSSL, --tls unavailable\n");
        return 2;
    }
#endif
    conns = calloc(nconns, sizeof *conns);
    hist = calloc(HIST_US, sizeof *hist);
    if (!conns || !hist) die("calloc");
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = client_fds[i];
        conns[i].bridge = tls ? bridge_fds[i] : -1;
    }
    for (int i = 0; i < nconns; i++) nonblocking(conns[i].fd);
    nonblocking(peer_fd);
#ifdef WITH_TLS
    if (tls) {
        tls_handshakes();
        printf("{\"handshakes\": %d}\n", nconns);
        fflush(stdout);
        bridge();
    }
#endif
    char line[65536];
    while (fgets(line, sizeof line, stdin)) {
        char dir[8];
        double rate, seconds, drain;
        if (!strncmp(line, "relays", 6)) {
            char *tok = strtok(line + 6, " \n");
            for (int i = 0; i < nconns && tok; i++, tok = strtok(NULL, " \n")) {
                char *colon = strrchr(tok, ':');
                if (!colon) break;
                *colon = 0;
                conns[i].relay.sin_family = AF_INET;
                conns[i].relay.sin_port = htons((uint16_t)atoi(colon + 1));
                inet_pton(AF_INET, tok, &conns[i].relay.sin_addr);
            }
            printf("{\"relays\": %d}\n", nconns);
            fflush(stdout);
        } else if (sscanf(line, "step %7s %lf %lf %lf", dir, &rate, &seconds, &drain) == 4 && rate > 0) {
            run_step(!strcmp(dir, "p2c"), rate, seconds, drain);
        } else if (!strncmp(line, "quit", 4)) {
            break;
        } else {
            fprintf(stderr, "loadgen: unknown command %s", line);
            return 2;
        }
    }
    return 0;
}
