/*
 * Preloaded (LD_PRELOAD) into the local fleet's bastion sshd, so that the connections it opens
 * for its clients' forwards (`ssh -J`, direct-tcpip) leave from the bastion's own loopback
 * address. On loopback every connection otherwise comes from 127.0.0.1, and a host that admits
 * only the bastion could not tell the bastion's forward from a direct login.
 *
 * Only unbound IPv4 TCP sockets connecting into 127.0.0.0/8 are bound, to the address in
 * ROLLER_FLEET_FORWARD_FROM, read once at load: whatever else sshd connects to is untouched.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static struct in_addr forward_from;
static int forward_from_set;

__attribute__((constructor)) static void read_forward_from(void)
{
    const char *text = getenv("ROLLER_FLEET_FORWARD_FROM");
    forward_from_set = text != NULL && inet_pton(AF_INET, text, &forward_from) == 1;
}

static int unbound_tcp(int fd)
{
    int type = 0;
    socklen_t type_len = sizeof type;
    struct sockaddr_in bound;
    socklen_t bound_len = sizeof bound;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) != 0 || type != SOCK_STREAM)
        return 0;
    memset(&bound, 0, sizeof bound);
    if (getsockname(fd, (struct sockaddr *)&bound, &bound_len) != 0)
        return 0;
    return bound.sin_family == AF_INET && bound.sin_port == 0 &&
           bound.sin_addr.s_addr == htonl(INADDR_ANY);
}

int connect(int fd, const struct sockaddr *to, socklen_t to_len)
{
    static int (*next_connect)(int, const struct sockaddr *, socklen_t);
    if (next_connect == NULL)
        next_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (forward_from_set && to != NULL && to->sa_family == AF_INET &&
        to_len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *target = (const struct sockaddr_in *)to;
        if ((ntohl(target->sin_addr.s_addr) >> 24) == 127 && unbound_tcp(fd)) {
            struct sockaddr_in from;
            memset(&from, 0, sizeof from);
            from.sin_family = AF_INET;
            from.sin_addr = forward_from;
            /* A failed bind leaves the source to the kernel: the host then refuses the
             * forward, which is the visible failure a misconfigured bastion deserves. */
            bind(fd, (const struct sockaddr *)&from, sizeof from);
        }
    }
    return next_connect(fd, to, to_len);
}
