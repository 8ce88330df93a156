// SPDX-License-Identifier: Apache-2.0
/* noded-cni as installed on a host: a static program that forwards the CNI call to the daemon, as
 * istio-cni's and Cilium's plugins do. It runs wherever the runtime runs it, with nothing of the image
 * (no Python) and no library.
 *
 * The call (the CNI_* variables, then the network configuration from stdin) goes to the daemon's
 * `cni.sock` beside its API socket (the configuration's "socket", default /run/noded/noded.sock), which
 * runs noded's own plugin logic (noded/cni/plugin.py) and answers with the exit code on the first line
 * and what to print after it. Request: "KEY=VALUE\n" lines, an empty line, the configuration, end of
 * stream. Bounded: 1 MiB each way, 30 s.
 *
 * The daemon unreachable: DEL and GC succeed (it drops dead pods on its next start), VERSION is
 * answered here, anything else is a CNI error 11 (try again later): no pod starts uncaptured behind
 * noded's back.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_IO (1 << 20)
#define DEFAULT_SOCKET "/run/noded/noded.sock"

static const char *VARS[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"};

static size_t read_all(int fd, char *buf, size_t cap)
{
	size_t n = 0;
	ssize_t r;

	while (n < cap && (r = read(fd, buf + n, cap - n)) != 0) {
		if (r < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		n += (size_t)r;
	}
	return n;
}

static int write_all(int fd, const char *buf, size_t len)
{
	ssize_t w;

	while (len) {
		w = write(fd, buf, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

/* The "socket" of the configuration, if it names one: "socket": "/abs/path" (no escapes in a path). */
static void conf_socket(const char *conf, char *out, size_t cap)
{
	const char *p = strstr(conf, "\"socket\"");
	const char *start, *end;

	snprintf(out, cap, "%s", DEFAULT_SOCKET);
	if (!p)
		return;
	p += strlen("\"socket\"");
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ':')
		p++;
	if (*p != '"')
		return;
	start = p + 1;
	end = strchr(start, '"');
	if (!end || end == start || *start != '/' || (size_t)(end - start) >= cap || memchr(start, '\\', end - start))
		return;
	snprintf(out, cap, "%.*s", (int)(end - start), start);
}

static int fail(const char *command, int code, const char *msg, const char *details)
{
	(void)command;
	printf("{\"cniVersion\": \"1.1.0\", \"code\": %d, \"msg\": \"%s\", \"details\": \"%s\"}\n", code, msg, details);
	return 1;
}

int main(void)
{
	static char conf[MAX_IO + 1], reply[MAX_IO + 1], api[sizeof(((struct sockaddr_un *)0)->sun_path)];
	const char *command = getenv("CNI_COMMAND") ? getenv("CNI_COMMAND") : "";
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	struct timeval timeout = {.tv_sec = 30};
	size_t conf_len = 0, reply_len, i;
	char *slash, *newline;
	int fd, code;

	if (strcmp(command, "VERSION") != 0)
		conf_len = read_all(0, conf, MAX_IO);
	conf[conf_len] = 0;
	conf_socket(conf, api, sizeof(api));
	slash = strrchr(api, '/');
	if (!slash || (size_t)(slash - api) + sizeof("/cni.sock") > sizeof(addr.sun_path))
		return fail(command, 7, "socket: not a usable path", api);
	snprintf(addr.sun_path, sizeof(addr.sun_path), "%.*s/cni.sock", (int)(slash - api), api);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		if (!strcmp(command, "DEL") || !strcmp(command, "GC"))
			return 0;
		if (!strcmp(command, "VERSION")) {
			printf("{\"cniVersion\": \"1.1.0\", \"supportedVersions\": "
			       "[\"0.4.0\", \"1.0.0\", \"1.1.0\"]}\n");
			return 0;
		}
		return fail(command, 11, "noded is not reachable (fail closed)", addr.sun_path);
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
	for (i = 0; i < sizeof(VARS) / sizeof(VARS[0]); i++) {
		const char *value = getenv(VARS[i]);

		if (!value || strchr(value, '\n'))
			continue;
		if (write_all(fd, VARS[i], strlen(VARS[i])) || write_all(fd, "=", 1) ||
		    write_all(fd, value, strlen(value)) || write_all(fd, "\n", 1))
			return fail(command, 11, "noded went away", "writing the request");
	}
	if (write_all(fd, "\n", 1) || write_all(fd, conf, conf_len))
		return fail(command, 11, "noded went away", "writing the request");
	shutdown(fd, SHUT_WR);
	reply_len = read_all(fd, reply, MAX_IO);
	close(fd);
	reply[reply_len] = 0;
	newline = memchr(reply, '\n', reply_len);
	if (!newline)
		return fail(command, 11, "noded did not answer", "no reply");
	*newline = 0;
	code = atoi(reply);
	fwrite(newline + 1, 1, reply_len - (size_t)(newline + 1 - reply), stdout);
	return code;
}
