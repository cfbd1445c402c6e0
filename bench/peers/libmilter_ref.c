/*
 * The benchmarks' reference milter written in C over Sendmail's libmilter (bench-only;
 * built by bench/setup-peers.sh from Debian's libmilter-dev, never part of milterapp).
 *
 * Every callback continues; end of message adds a header and accepts. With --eom-only
 * only the end-of-message callback is registered.
 * Run: bench/.venv-peers/bin/libmilter_ref SPEC [--eom-only]
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static sfsistat go_on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr)
{
    (void)ctx; (void)host; (void)addr;
    return SMFIS_CONTINUE;
}

static sfsistat go_on_one(SMFICTX *ctx, char *arg)
{
    (void)ctx; (void)arg;
    return SMFIS_CONTINUE;
}

static sfsistat go_on_args(SMFICTX *ctx, char **argv)
{
    (void)ctx; (void)argv;
    return SMFIS_CONTINUE;
}

static sfsistat go_on_header(SMFICTX *ctx, char *name, char *value)
{
    (void)ctx; (void)name; (void)value;
    return SMFIS_CONTINUE;
}

static sfsistat go_on_none(SMFICTX *ctx)
{
    (void)ctx;
    return SMFIS_CONTINUE;
}

static sfsistat go_on_body(SMFICTX *ctx, unsigned char *chunk, size_t size)
{
    (void)ctx; (void)chunk; (void)size;
    return SMFIS_CONTINUE;
}

static sfsistat stamp(SMFICTX *ctx)
{
    if (smfi_addheader(ctx, "X-Bench", "yes") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_ACCEPT;
}

int main(int argc, char **argv)
{
    struct smfiDesc desc;
    int eom_only = argc > 2 && strcmp(argv[2], "--eom-only") == 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s SPEC [--eom-only]\n", argv[0]);
        return 2;
    }
    memset(&desc, 0, sizeof desc);
    desc.xxfi_name = "reference";
    desc.xxfi_version = SMFI_VERSION;
    desc.xxfi_flags = SMFIF_ADDHDRS;
    desc.xxfi_eom = stamp;
    if (!eom_only) {
        desc.xxfi_connect = go_on_connect;
        desc.xxfi_helo = go_on_one;
        desc.xxfi_envfrom = go_on_args;
        desc.xxfi_envrcpt = go_on_args;
        desc.xxfi_data = go_on_none;
        desc.xxfi_header = go_on_header;
        desc.xxfi_eoh = go_on_none;
        desc.xxfi_body = go_on_body;
    }
    if (smfi_setconn(argv[1]) != MI_SUCCESS || smfi_setbacklog(1024) != MI_SUCCESS ||
        smfi_settimeout(600) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "libmilter_ref: cannot set up %s\n", argv[1]);
        return 1;
    }
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
