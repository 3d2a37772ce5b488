/*
 * xc_standin.c - LD_PRELOAD stand-in for four libxc (Xen 4.17) entry points:
 *
 *   xc_interface_open, xc_interface_close, xc_domain_save, xc_domain_restore
 *
 * so that Xen 4.17's real libxl-save-helper can run on a machine without a
 * hypervisor.  The control flow (which callbacks are invoked, in which order,
 * and how their return values are interpreted) follows libxc 4.17
 * (tools/libs/guest/xg_sr_save.c, xg_sr_restore.c and friends at
 * RELEASE-4.17.7); guest memory and hypervisor state are synthesised.
 *
 * Written from scratch for the conformance tests; see STANDIN.md for the
 * behaviour, the environment variables and the libxc lines it follows.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <xentoollog.h>
#include <xenctrl.h>
#include <xenguest.h>
#include <xen/hvm/params.h>

/* ------------------------------------------------------------------ */
/* Stream format constants (docs/specs/libxc-migration-stream.pandoc)  */

#define SI_PAGE_SIZE        4096u
#define SI_PAGE_SHIFT       12u
#define SI_REC_LENGTH_MAX   (128u << 20)
#define SI_MAX_BATCH        1024u
#define SI_ROUNDUP8(x)      (((x) + 7u) & ~(size_t)7u)

#define IHDR_MARKER         0xffffffffffffffffULL
#define IHDR_ID             0x58454E46u          /* "XENF" */
#define IHDR_OPT_BIG_ENDIAN 0x0001u

#define DHDR_TYPE_X86_PV    1u
#define DHDR_TYPE_X86_HVM   2u

#define REC_TYPE_END                        0x00u
#define REC_TYPE_PAGE_DATA                  0x01u
#define REC_TYPE_X86_PV_INFO                0x02u
#define REC_TYPE_X86_PV_P2M_FRAMES          0x03u
#define REC_TYPE_X86_PV_VCPU_BASIC          0x04u
#define REC_TYPE_X86_PV_VCPU_EXTENDED       0x05u
#define REC_TYPE_X86_PV_VCPU_XSAVE          0x06u
#define REC_TYPE_SHARED_INFO                0x07u
#define REC_TYPE_X86_TSC_INFO               0x08u
#define REC_TYPE_HVM_CONTEXT                0x09u
#define REC_TYPE_HVM_PARAMS                 0x0Au
#define REC_TYPE_TOOLSTACK                  0x0Bu
#define REC_TYPE_X86_PV_VCPU_MSRS           0x0Cu
#define REC_TYPE_VERIFY                     0x0Du
#define REC_TYPE_CHECKPOINT                 0x0Eu
#define REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST  0x0Fu
#define REC_TYPE_STATIC_DATA_END            0x10u
#define REC_TYPE_X86_CPUID_POLICY           0x11u
#define REC_TYPE_X86_MSR_POLICY             0x12u
#define REC_TYPE_OPTIONAL                   0x80000000u

#define PAGE_DATA_PFN_MASK  0x000fffffffffffffULL
#define PAGE_DATA_TYPE_MASK 0xf000000000000000ULL

/* XEN_DOMCTL_PFINFO_* values, already shifted down to a nibble. */
#define PT_NOTAB   0x0u
#define PT_LPINTAB 0x8u
#define PT_BROKEN  0xDu
#define PT_XALLOC  0xEu
#define PT_XTAB    0xFu

/* libxc internal return codes (xg_sr_common.h). */
#define RECORD_NOT_PROCESSED 1
#define BROKEN_CHANNEL       2

/* Values the stand-in saver puts in HVM_PARAMS. */
#define STANDIN_STORE_GFN    0xfeffcULL
#define STANDIN_CONSOLE_GFN  0xfefffULL

/* Page contents: first 16 bytes = u64 pfn, u32 generation, u32 magic. */
#define STANDIN_PAGE_MAGIC   0x4e445453u   /* "STDN" little-endian */

/* ------------------------------------------------------------------ */
/* The handle                                                          */

#define STANDIN_HANDLE_MAGIC 0x58435354u   /* "XCST" */

struct xc_interface_core {
    uint32_t magic;
    xentoollog_logger *logger;          /* error/progress logger */
    xentoollog_logger *dombuild_logger;
    xentoollog_logger *own_logger;      /* created if caller gave NULL */
    const char *progress_prefix;
    unsigned open_flags;
};

static const char *dhdr_type_str(uint32_t type)
{
    switch ( type )
    {
    case DHDR_TYPE_X86_PV:  return "x86 PV";
    case DHDR_TYPE_X86_HVM: return "x86 HVM";
    default:                return "Reserved";
    }
}

static const char *rec_type_str(uint32_t type)
{
    static const char *const names[] = {
        [REC_TYPE_END]                       = "End",
        [REC_TYPE_PAGE_DATA]                 = "Page data",
        [REC_TYPE_X86_PV_INFO]               = "x86 PV info",
        [REC_TYPE_X86_PV_P2M_FRAMES]         = "x86 PV P2M frames",
        [REC_TYPE_X86_PV_VCPU_BASIC]         = "x86 PV vcpu basic",
        [REC_TYPE_X86_PV_VCPU_EXTENDED]      = "x86 PV vcpu extended",
        [REC_TYPE_X86_PV_VCPU_XSAVE]         = "x86 PV vcpu xsave",
        [REC_TYPE_SHARED_INFO]               = "Shared info",
        [REC_TYPE_X86_TSC_INFO]              = "x86 TSC info",
        [REC_TYPE_HVM_CONTEXT]               = "HVM context",
        [REC_TYPE_HVM_PARAMS]                = "HVM params",
        [REC_TYPE_TOOLSTACK]                 = "Toolstack",
        [REC_TYPE_X86_PV_VCPU_MSRS]          = "x86 PV vcpu msrs",
        [REC_TYPE_VERIFY]                    = "Verify",
        [REC_TYPE_CHECKPOINT]                = "Checkpoint",
        [REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST] = "Checkpoint dirty pfn list",
        [REC_TYPE_STATIC_DATA_END]           = "Static data end",
        [REC_TYPE_X86_CPUID_POLICY]          = "x86 CPUID policy",
        [REC_TYPE_X86_MSR_POLICY]            = "x86 MSR policy",
    };

    if ( !(type & REC_TYPE_OPTIONAL) &&
         type < sizeof(names) / sizeof(names[0]) && names[type] )
        return names[type];
    return "Reserved";
}

/* ------------------------------------------------------------------ */
/* Logging, shaped like libxc's xc_reportv()/PERROR()/ERROR()          */

static xentoollog_logger *lg(xc_interface *xch)
{
    return xch ? xch->logger : NULL;
}

/* xc_reportv() strips one trailing newline from the format. */
static void strip_newline(char *msg)
{
    size_t n = strlen(msg);

    if ( n && msg[n - 1] == '\n' )
        msg[n - 1] = '\0';
}

__attribute__((format(printf, 4, 0)))
static void si_vreport(xc_interface *xch, xentoollog_level level,
                       const char *suffix, const char *fmt, va_list ap)
{
    int saved_errno = errno;
    char msg[1024];
    xentoollog_logger *l = lg(xch);

    vsnprintf(msg, sizeof(msg), fmt, ap);
    strip_newline(msg);
    if ( l )
        xtl_log(l, level, -1, "xc", "%s%s", msg, suffix ? suffix : "");
    errno = saved_errno;
}

__attribute__((format(printf, 3, 4)))
static void si_log(xc_interface *xch, xentoollog_level level,
                   const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    si_vreport(xch, level, NULL, fmt, ap);
    va_end(ap);
}

#define IPRINTF(...)   si_log(xch, XTL_INFO, __VA_ARGS__)
#define DPRINTF(...)   si_log(xch, XTL_DETAIL, __VA_ARGS__)
#define DBGPRINTF(...) si_log(xch, XTL_DEBUG, __VA_ARGS__)

/* ERROR(): level ERROR, libxc appends ": Internal error". */
__attribute__((format(printf, 2, 3)))
static void si_error(xc_interface *xch, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    si_vreport(xch, XTL_ERROR, ": Internal error", fmt, ap);
    va_end(ap);
}

/* PERROR(): as ERROR() plus " (errno = strerror)". */
__attribute__((format(printf, 2, 3)))
static void si_perror(xc_interface *xch, const char *fmt, ...)
{
    int saved_errno = errno;
    char msg[1024], sfx[160];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    strip_newline(msg);
    snprintf(sfx, sizeof(sfx), " (%d = %s): Internal error",
             saved_errno, strerror(saved_errno));
    if ( lg(xch) )
        xtl_log(lg(xch), XTL_ERROR, -1, "xc", "%s%s", msg, sfx);
    errno = saved_errno;
}

#define ERROR(...)  si_error(xch, __VA_ARGS__)
#define PERROR(...) si_perror(xch, __VA_ARGS__)

static void progress_single(xc_interface *xch, const char *doing)
{
    int saved_errno = errno;

    if ( lg(xch) )
        xtl_progress(lg(xch), "xc", doing, 0, 0);
    errno = saved_errno;
}

static void progress_step(xc_interface *xch, unsigned long done,
                          unsigned long total)
{
    int saved_errno = errno;

    if ( lg(xch) && xch->progress_prefix )
        xtl_progress(lg(xch), "xc", xch->progress_prefix, done, total);
    errno = saved_errno;
}

/* libxc's assert()s on the callback set: same effect (message + SIGABRT). */
__attribute__((noreturn))
static void standin_assert_fail(const char *func, const char *file,
                                unsigned line, const char *expr,
                                const char *missing)
{
    fprintf(stderr, "xc_standin: %s: required callback(s) missing: %s\n",
            func, missing);
    fprintf(stderr, "%s: %s:%u: %s: Assertion `%s' failed.\n",
            program_invocation_short_name, file, line, func, expr);
    fflush(stderr);
    abort();
}

/* ------------------------------------------------------------------ */
/* Environment                                                         */

static long env_long(const char *name, long dflt, long min, long max)
{
    const char *s = getenv(name);
    char *end;
    long v;

    if ( !s || !*s )
        return dflt;
    errno = 0;
    v = strtol(s, &end, 0);
    if ( errno || *end || v < min || v > max )
        return dflt;
    return v;
}

/* 1 = HVM, 0 = PV, -1 = unset/invalid. */
static int env_domtype(void)
{
    const char *s = getenv("XC_STANDIN_DOMTYPE");

    if ( !s || !*s )
        return -1;
    if ( !strcasecmp(s, "hvm") )
        return 1;
    if ( !strcasecmp(s, "pv") )
        return 0;
    return -1;
}

/* ------------------------------------------------------------------ */
/* Exact I/O, as tools/libs/ctrl/xc_private.c read_exact/write_exact    */

static int si_read_exact(int fd, void *data, size_t size)
{
    size_t off = 0;
    ssize_t len;

    while ( off < size )
    {
        len = read(fd, (char *)data + off, size - off);
        if ( len == -1 && errno == EINTR )
            continue;
        if ( len == 0 )
            errno = 0;
        if ( len <= 0 )
            return -1;
        off += len;
    }
    return 0;
}

static int si_write_exact(int fd, const void *data, size_t size)
{
    size_t off = 0;
    ssize_t len;

    while ( off < size )
    {
        len = write(fd, (const char *)data + off, size - off);
        if ( len == -1 && errno == EINTR )
            continue;
        if ( len <= 0 )
            return -1;
        off += len;
    }
    return 0;
}

struct si_rec {
    uint32_t type;
    uint32_t length;
    void *data;             /* ROUNDUP8(length) bytes, or NULL */
};

/* read_record() of xg_sr_common.c: header, then ROUNDUP(length, 8). */
static int si_read_record(xc_interface *xch, int fd, struct si_rec *rec)
{
    uint32_t rhdr[2];
    size_t datasz;

    rec->data = NULL;
    if ( si_read_exact(fd, rhdr, sizeof(rhdr)) )
    {
        PERROR("Failed to read Record Header from stream");
        return -1;
    }
    if ( rhdr[1] > SI_REC_LENGTH_MAX )
    {
        ERROR("Record (0x%08x, %s) length %#x exceeds max (%#x)", rhdr[0],
              rec_type_str(rhdr[0]), rhdr[1], SI_REC_LENGTH_MAX);
        return -1;
    }
    datasz = SI_ROUNDUP8((size_t)rhdr[1]);
    if ( datasz )
    {
        rec->data = malloc(datasz);
        if ( !rec->data )
        {
            ERROR("Unable to allocate %zu bytes for record data (0x%08x, %s)",
                  datasz, rhdr[0], rec_type_str(rhdr[0]));
            return -1;
        }
        if ( si_read_exact(fd, rec->data, datasz) )
        {
            free(rec->data);
            rec->data = NULL;
            PERROR("Failed to read %zu bytes of data for record (0x%08x, %s)",
                   datasz, rhdr[0], rec_type_str(rhdr[0]));
            return -1;
        }
    }
    rec->type = rhdr[0];
    rec->length = rhdr[1];
    return 0;
}

/* ------------------------------------------------------------------ */
/* xc_interface_open / close                                           */

xc_interface *xc_interface_open(xentoollog_logger *logger,
                                xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    xc_interface *xch = calloc(1, sizeof(*xch));

    if ( !xch )
    {
        errno = ENOMEM;
        return NULL;
    }

    xch->magic = STANDIN_HANDLE_MAGIC;
    xch->open_flags = open_flags;
    if ( !logger )
    {
        xch->own_logger = (xentoollog_logger *)
            xtl_createlogger_stdiostream(stderr, XTL_PROGRESS, 0);
        logger = xch->own_logger;
    }
    xch->logger = logger;
    xch->dombuild_logger = dombuild_logger ? dombuild_logger : logger;

    DBGPRINTF("xc_standin: stand-in libxc interface opened (no hypervisor; "
              "open_flags %#x)", open_flags);
    IPRINTF("xc_standin: emulating Xen 4.17 libxc save/restore (pid %d)",
            (int)getpid());

    return xch;
}

int xc_interface_close(xc_interface *xch)
{
    if ( !xch )
        return 0;
    xch->magic = 0;
    if ( xch->own_logger )
        xtl_logger_destroy(xch->own_logger);
    free(xch);
    return 0;
}

/* ------------------------------------------------------------------ */
/* SAVE                                                                */

struct save_ctx {
    xc_interface *xch;
    int fd;
    int recv_fd;
    uint32_t domid;
    struct save_callbacks *cb;
    xc_stream_type_t stream_type;

    bool hvm;
    bool live;
    bool debug;
    bool qemu_enabled_logdirty;

    unsigned long p2m_size;      /* pfns 0 .. p2m_size-1 */
    unsigned long xtab_pfn;      /* the one pfn sent as XTAB (no data) */
    unsigned long nr_pages;      /* pfns with data: 0 .. nr_pages-1 */
    unsigned long nr_dirty;      /* pages dirtied per later pass */

    uint8_t *dirty;              /* one byte per pfn */
    uint64_t *batch;             /* pfns in the current batch */
    unsigned nr_batch;

    unsigned generation;         /* number of suspend callbacks made */
    unsigned checkpoints;        /* CHECKPOINT records written */
    long max_checkpoints;        /* -1: unlimited */
    bool broken;                 /* simulated broken stream */

    uint64_t pages_sent;
    uint64_t records;
};

static int save_write(struct save_ctx *ctx, const void *buf, size_t len)
{
    if ( ctx->broken )
    {
        errno = EPIPE;
        return -1;
    }
    return si_write_exact(ctx->fd, buf, len);
}

/* write_split_record() of xg_sr_common.c: header, body, zero padding. */
static int save_write_record(struct save_ctx *ctx, uint32_t type,
                             const void *hdr, size_t hdrlen,
                             const void *body, size_t bodylen)
{
    xc_interface *xch = ctx->xch;
    size_t len = hdrlen + bodylen, total = 8 + SI_ROUNDUP8(len);
    uint8_t *buf;
    uint32_t rh[2] = { type, (uint32_t)len };
    int rc;

    if ( SI_ROUNDUP8(len) > SI_REC_LENGTH_MAX )
    {
        ERROR("Record (0x%08x, %s) length %#zx exceeds max (%#x)", type,
              rec_type_str(type), SI_ROUNDUP8(len), SI_REC_LENGTH_MAX);
        return -1;
    }

    buf = calloc(1, total);
    if ( !buf )
    {
        ERROR("Unable to allocate %zu bytes for record", total);
        return -1;
    }
    memcpy(buf, rh, 8);
    if ( hdrlen )
        memcpy(buf + 8, hdr, hdrlen);
    if ( bodylen )
        memcpy(buf + 8 + hdrlen, body, bodylen);

    rc = save_write(ctx, buf, total);
    free(buf);
    if ( rc )
    {
        PERROR("Unable to write record to stream");
        return -1;
    }
    ctx->records++;
    return 0;
}

static void fill_page(uint8_t *page, uint64_t pfn, uint32_t generation)
{
    uint32_t magic = STANDIN_PAGE_MAGIC;

    memset(page, (int)(uint8_t)(pfn + generation), SI_PAGE_SIZE);
    memcpy(page, &pfn, 8);
    memcpy(page + 8, &generation, 4);
    memcpy(page + 12, &magic, 4);
}

/* write_batch() of xg_sr_save.c: one PAGE_DATA record. */
static int save_write_batch(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    unsigned i, nr = ctx->nr_batch, with_data = 0;
    size_t len, total;
    uint8_t *buf, *p;
    uint32_t rh[2], ph[2];
    uint64_t word;

    for ( i = 0; i < nr; i++ )
        if ( ctx->batch[i] != ctx->xtab_pfn )
            with_data++;

    len = 8 + 8 * (size_t)nr + (size_t)SI_PAGE_SIZE * with_data;
    total = 8 + len;       /* always a multiple of 8 */
    buf = malloc(total);
    if ( !buf )
    {
        ERROR("Unable to allocate arrays for a batch of %u pages", nr);
        return -1;
    }

    rh[0] = REC_TYPE_PAGE_DATA;
    rh[1] = (uint32_t)len;
    ph[0] = nr;
    ph[1] = 0;
    memcpy(buf, rh, 8);
    memcpy(buf + 8, ph, 8);
    p = buf + 16;
    for ( i = 0; i < nr; i++, p += 8 )
    {
        uint64_t type = (ctx->batch[i] == ctx->xtab_pfn) ? PT_XTAB : PT_NOTAB;

        word = (type << 60) | ctx->batch[i];
        memcpy(p, &word, 8);
    }
    for ( i = 0; i < nr; i++ )
    {
        if ( ctx->batch[i] == ctx->xtab_pfn )
            continue;
        fill_page(p, ctx->batch[i], ctx->generation);
        p += SI_PAGE_SIZE;
    }

    if ( save_write(ctx, buf, total) )
    {
        free(buf);
        PERROR("Failed to write page data to stream");
        return -1;
    }
    free(buf);

    ctx->records++;
    ctx->pages_sent += with_data;
    ctx->nr_batch = 0;
    return 0;
}

/* send_dirty_pages() of xg_sr_save.c. */
static int save_send_dirty_pages(struct save_ctx *ctx, unsigned long entries)
{
    xc_interface *xch = ctx->xch;
    unsigned long p, written = 0;
    int rc;

    for ( p = 0; p < ctx->p2m_size; p++ )
    {
        if ( !ctx->dirty[p] )
            continue;

        if ( ctx->nr_batch == SI_MAX_BATCH )
        {
            rc = save_write_batch(ctx);
            if ( rc )
                return rc;
        }
        ctx->batch[ctx->nr_batch++] = p;

        if ( (written & ((1u << (22 - 12)) - 1)) == 0 )
            progress_step(xch, written, entries);
        written++;
    }

    if ( ctx->nr_batch )
    {
        rc = save_write_batch(ctx);
        if ( rc )
            return rc;
    }

    progress_step(xch, entries, entries);
    memset(ctx->dirty, 0, ctx->p2m_size);
    return 0;
}

static int save_send_all_pages(struct save_ctx *ctx)
{
    memset(ctx->dirty, 1, ctx->p2m_size);
    return save_send_dirty_pages(ctx, ctx->p2m_size);
}

/* suspend_domain() of xg_sr_save.c. */
static int save_suspend_domain(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    int cb_rc = ctx->cb->suspend(ctx->cb->data);

    ctx->generation++;
    if ( cb_rc == 0 )
    {
        ERROR("save callback suspend() failed: %d", cb_rc);
        return -1;
    }

    /* (libxc re-reads the domain state here; the stand-in trusts the reply.) */
    progress_single(xch, "Domain now suspended");
    return 0;
}

/* colo_merge_secondary_dirty_bitmap() of xg_sr_save.c. */
static int save_colo_merge(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    struct si_rec rec;
    uint64_t pfn;
    unsigned i, count;
    int rc;

    rc = si_read_record(xch, ctx->recv_fd, &rec);
    if ( rc )
        goto err;

    if ( rec.type != REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST )
    {
        PERROR("Expect dirty bitmap record, but received %u", rec.type);
        rc = -1;
        goto err;
    }
    if ( rec.length % 8 )
    {
        PERROR("Invalid dirty pfn list record length %u", rec.length);
        rc = -1;
        goto err;
    }

    count = rec.length / 8;
    for ( i = 0; i < count; i++ )
    {
        memcpy(&pfn, (uint8_t *)rec.data + 8 * i, 8);
        if ( pfn >= ctx->p2m_size )
        {
            PERROR("Invalid pfn 0x%" PRIx64, pfn);
            rc = -1;
            goto err;
        }
        ctx->dirty[pfn] = 1;
    }
    DBGPRINTF("xc_standin: merged %u secondary dirty pfn(s)", count);
    rc = 0;

 err:
    free(rec.data);
    return rc;
}

static void save_mark_guest_dirty(struct save_ctx *ctx)
{
    unsigned long i, n = ctx->nr_dirty < ctx->nr_pages ? ctx->nr_dirty
                                                       : ctx->nr_pages;

    for ( i = 0; i < n; i++ )
        ctx->dirty[i] = 1;
}

/* suspend_and_send_dirty() of xg_sr_save.c. */
static int save_suspend_and_send_dirty(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    unsigned long i, entries = 0;
    int rc;

    rc = save_suspend_domain(ctx);
    if ( rc )
        goto out;

    xch->progress_prefix = ctx->live ? "Frames iteration 0"
                                     : "Checkpointed save";

    /* Pages the (synthetic) guest dirtied since the last pass. */
    save_mark_guest_dirty(ctx);

    if ( !ctx->live && ctx->stream_type == XC_STREAM_COLO )
    {
        rc = save_colo_merge(ctx);
        if ( rc )
        {
            PERROR("Failed to get secondary vm's dirty pages");
            goto out;
        }
    }

    for ( i = 0; i < ctx->p2m_size; i++ )
        entries += ctx->dirty[i];

    rc = save_send_dirty_pages(ctx, entries);

 out:
    xch->progress_prefix = NULL;
    return rc;
}

/* send_domain_memory_live(): precopy (one pass; small guest), then final. */
static int save_memory_live(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    int rc;

    xch->progress_prefix = "Frames iteration 0";
    rc = save_send_all_pages(ctx);
    xch->progress_prefix = NULL;
    if ( rc )
        return rc;

    rc = save_suspend_and_send_dirty(ctx);
    if ( rc )
        return rc;

    if ( ctx->debug && ctx->stream_type == XC_STREAM_PLAIN )
    {
        rc = save_write_record(ctx, REC_TYPE_VERIFY, NULL, 0, NULL, 0);
        if ( rc )
            return rc;
        xch->progress_prefix = "Frames verify";
        rc = save_send_all_pages(ctx);
        xch->progress_prefix = NULL;
    }
    return rc;
}

/* send_domain_memory_nonlive(). */
static int save_memory_nonlive(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    int rc;

    rc = save_suspend_domain(ctx);
    if ( rc )
        return rc;

    xch->progress_prefix = "Frames";
    rc = save_send_all_pages(ctx);
    xch->progress_prefix = NULL;
    return rc;
}

static int save_static_data(struct save_ctx *ctx)
{
    xen_cpuid_leaf_t leaves[2] = {
        /* leaf 0: max leaf 0xd, "GenuineIntel" */
        { 0, XEN_CPUID_NO_SUBLEAF, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69 },
        { 1, XEN_CPUID_NO_SUBLEAF, 0x000506e3, 0x00000800,
          0x80982201, 0x178bfbff },
    };
    xen_msr_entry_t msrs[1] = {
        { 0xce /* MSR_INTEL_PLATFORM_INFO */, 0, 0 },
    };
    int rc;

    if ( !ctx->hvm )
    {
        uint8_t info[8] = { 8 /* width */, 4 /* pt_levels */ };

        rc = save_write_record(ctx, REC_TYPE_X86_PV_INFO, info, sizeof(info),
                               NULL, 0);
        if ( rc )
            return rc;
    }

    rc = save_write_record(ctx, REC_TYPE_X86_CPUID_POLICY, leaves,
                           sizeof(leaves), NULL, 0);
    if ( rc )
        return rc;

    return save_write_record(ctx, REC_TYPE_X86_MSR_POLICY, msrs, sizeof(msrs),
                             NULL, 0);
}

static int save_start_of_stream(struct save_ctx *ctx)
{
    /* PV: X86_PV_P2M_FRAMES covering pfns 0 .. p2m_size-1. */
    uint32_t hdr[2];
    unsigned long fpp = SI_PAGE_SIZE / 8, i, frames;
    uint64_t *list;
    int rc;

    if ( ctx->hvm )
        return 0;

    hdr[0] = 0;
    hdr[1] = (uint32_t)(ctx->p2m_size - 1);
    frames = hdr[1] / fpp + 1;
    list = calloc(frames, sizeof(*list));
    if ( !list )
        return -1;
    for ( i = 0; i < frames; i++ )
        list[i] = 0x10000 + i;      /* synthetic p2m frame pfns */

    rc = save_write_record(ctx, REC_TYPE_X86_PV_P2M_FRAMES, hdr, sizeof(hdr),
                           list, frames * sizeof(*list));
    free(list);
    return rc;
}

static int save_end_of_checkpoint(struct save_ctx *ctx)
{
    struct {
        uint32_t mode, khz;
        uint64_t nsec;
        uint32_t incarnation, res;
    } tsc = { 0, 2000000, 1000000000ULL * (ctx->checkpoints + 1),
              ctx->checkpoints, 0 };
    xc_interface *xch = ctx->xch;
    int rc;

    _Static_assert(sizeof(tsc) == 24, "TSC_INFO must be 24 bytes");

    rc = save_write_record(ctx, REC_TYPE_X86_TSC_INFO, &tsc, sizeof(tsc),
                           NULL, 0);
    if ( rc )
        return rc;

    if ( ctx->hvm )
    {
        /*
         * A small but well-formed HVM context: a HEADER save record
         * (typecode 1, magic/version/changeset/cpuid/gtsc_khz) followed by
         * the END save record (typecode 0).
         */
        uint8_t blob[40];
        uint16_t code, inst = 0;
        uint32_t dlen, magic = 0x54381286u, ver = 1, cpuid = 0x000506e3,
            khz = 2000000;
        uint64_t changeset = ctx->checkpoints;

        memset(blob, 0, sizeof(blob));
        code = 1; dlen = 24;
        memcpy(blob + 0, &code, 2);
        memcpy(blob + 2, &inst, 2);
        memcpy(blob + 4, &dlen, 4);
        memcpy(blob + 8, &magic, 4);
        memcpy(blob + 12, &ver, 4);
        memcpy(blob + 16, &changeset, 8);
        memcpy(blob + 24, &cpuid, 4);
        memcpy(blob + 28, &khz, 4);
        /* END descriptor: all zero at blob + 32. */

        rc = save_write_record(ctx, REC_TYPE_HVM_CONTEXT, blob, sizeof(blob),
                               NULL, 0);
        if ( rc )
        {
            PERROR("error write HVM_CONTEXT record");
            return rc;
        }

        {
            uint32_t hdr[2] = { 2, 0 };
            uint64_t entries[4] = {
                HVM_PARAM_STORE_PFN,   STANDIN_STORE_GFN,
                HVM_PARAM_CONSOLE_PFN, STANDIN_CONSOLE_GFN,
            };

            rc = save_write_record(ctx, REC_TYPE_HVM_PARAMS, hdr, sizeof(hdr),
                                   entries, sizeof(entries));
            if ( rc )
                PERROR("Failed to write HVM_PARAMS record");
            return rc;
        }
    }
    else
    {
        uint8_t *shinfo = calloc(1, SI_PAGE_SIZE);
        uint8_t *vcpu;
        uint32_t vhdr[2] = { 0, 0 };
        size_t vlen = sizeof(vcpu_guest_context_t);

        if ( !shinfo )
            return -1;
        rc = save_write_record(ctx, REC_TYPE_SHARED_INFO, shinfo, SI_PAGE_SIZE,
                               NULL, 0);
        free(shinfo);
        if ( rc )
            return rc;

        vcpu = calloc(1, vlen);
        if ( !vcpu )
            return -1;
        memset(vcpu, 0x5a, 64);
        rc = save_write_record(ctx, REC_TYPE_X86_PV_VCPU_BASIC, vhdr,
                               sizeof(vhdr), vcpu, vlen);
        free(vcpu);
        return rc;
    }
}

static int save_write_headers(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    uint8_t ihdr[24], dhdr[16];
    uint32_t v32;
    uint16_t v16;

    memset(ihdr, 0xff, 8);
    v32 = htonl(IHDR_ID);      memcpy(ihdr + 8, &v32, 4);
    v32 = htonl(3);            memcpy(ihdr + 12, &v32, 4);
    v16 = htons(0);            memcpy(ihdr + 16, &v16, 2);   /* LE stream */
    memset(ihdr + 18, 0, 6);

    v32 = ctx->hvm ? DHDR_TYPE_X86_HVM : DHDR_TYPE_X86_PV;
    memcpy(dhdr, &v32, 4);
    v16 = SI_PAGE_SHIFT;       memcpy(dhdr + 4, &v16, 2);
    v16 = 0;                   memcpy(dhdr + 6, &v16, 2);
    v32 = 4;                   memcpy(dhdr + 8, &v32, 4);
    v32 = 17;                  memcpy(dhdr + 12, &v32, 4);

    if ( save_write(ctx, ihdr, sizeof(ihdr)) )
    {
        PERROR("Unable to write Image Header to stream");
        return -1;
    }
    if ( save_write(ctx, dhdr, sizeof(dhdr)) )
    {
        PERROR("Unable to write Domain Header to stream");
        return -1;
    }
    return 0;
}

static void save_cleanup(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;

    if ( ctx->hvm && ctx->qemu_enabled_logdirty &&
         ctx->cb->switch_qemu_logdirty(ctx->domid, 0, ctx->cb->data) )
    {
        PERROR("Couldn't disable qemu log-dirty mode");
        PERROR("Failed to clean up");
    }

    free(ctx->dirty);
    free(ctx->batch);
    ctx->dirty = NULL;
    ctx->batch = NULL;
}

/* save() of xg_sr_save.c. */
static int save_run(struct save_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    int rc, saved_rc = 0, saved_errno = 0;

    IPRINTF("Saving domain %d, type %s", ctx->domid,
            dhdr_type_str(ctx->hvm ? DHDR_TYPE_X86_HVM : DHDR_TYPE_X86_PV));

    /* setup(): x86_hvm_setup() asks qemu to enable log-dirty. */
    ctx->dirty = calloc(ctx->p2m_size, 1);
    ctx->batch = malloc(SI_MAX_BATCH * sizeof(*ctx->batch));
    if ( !ctx->dirty || !ctx->batch )
    {
        ERROR("Unable to allocate memory for dirty bitmaps, batch pfns and"
              " deferred pages");
        errno = ENOMEM;
        rc = -1;
        goto err;
    }
    if ( ctx->hvm )
    {
        if ( ctx->cb->switch_qemu_logdirty(ctx->domid, 1, ctx->cb->data) )
        {
            PERROR("Couldn't enable qemu log-dirty mode");
            rc = -1;
            goto err;
        }
        ctx->qemu_enabled_logdirty = true;
    }

    progress_single(xch, "Start of stream");

    rc = save_write_headers(ctx);
    if ( rc )
        goto err;

    rc = save_static_data(ctx);
    if ( rc )
        goto err;

    rc = save_write_record(ctx, REC_TYPE_STATIC_DATA_END, NULL, 0, NULL, 0);
    if ( rc )
        goto err;

    rc = save_start_of_stream(ctx);
    if ( rc )
        goto err;

    do {
        if ( ctx->live )
            rc = save_memory_live(ctx);
        else if ( ctx->stream_type != XC_STREAM_PLAIN )
            rc = save_suspend_and_send_dirty(ctx);
        else
            rc = save_memory_nonlive(ctx);
        if ( rc )
            goto err;

        rc = save_end_of_checkpoint(ctx);
        if ( rc )
            goto err;

        if ( ctx->stream_type != XC_STREAM_PLAIN )
        {
            ctx->live = false;

            rc = save_write_record(ctx, REC_TYPE_CHECKPOINT, NULL, 0, NULL, 0);
            if ( rc )
                goto err;
            ctx->checkpoints++;
            if ( ctx->max_checkpoints >= 0 &&
                 ctx->checkpoints >= (unsigned long)ctx->max_checkpoints )
            {
                DBGPRINTF("xc_standin: XC_STANDIN_MAX_CHECKPOINTS=%ld reached;"
                          " further stream writes fail with EPIPE",
                          ctx->max_checkpoints);
                ctx->broken = true;
            }

            if ( ctx->stream_type == XC_STREAM_COLO )
            {
                rc = ctx->cb->checkpoint(ctx->cb->data);
                if ( !rc )
                {
                    rc = -1;
                    goto err;
                }
            }

            rc = ctx->cb->postcopy(ctx->cb->data);
            if ( rc <= 0 )
                goto err;

            if ( ctx->stream_type == XC_STREAM_COLO )
            {
                rc = ctx->cb->wait_checkpoint(ctx->cb->data);
                if ( rc <= 0 )
                    goto err;
            }
            else if ( ctx->stream_type == XC_STREAM_REMUS )
            {
                rc = ctx->cb->checkpoint(ctx->cb->data);
                if ( rc <= 0 )
                    goto err;
            }
            else
            {
                ERROR("Unknown checkpointed stream");
                rc = -1;
                goto err;
            }
        }
    } while ( ctx->stream_type != XC_STREAM_PLAIN );

    progress_single(xch, "End of stream");

    rc = save_write_record(ctx, REC_TYPE_END, NULL, 0, NULL, 0);
    if ( rc )
        goto err;

    progress_single(xch, "Complete");
    goto done;

 err:
    saved_errno = errno;
    saved_rc = rc;
    PERROR("Save failed");

 done:
    save_cleanup(ctx);

    DBGPRINTF("xc_standin: save summary: records %" PRIu64 ", pages %" PRIu64
              ", checkpoints %u, suspends %u, rc %d", ctx->records,
              ctx->pages_sent, ctx->checkpoints, ctx->generation,
              saved_rc ? saved_rc : rc);

    if ( saved_rc )
    {
        rc = saved_rc;
        errno = saved_errno;
    }
    return rc;
}

int xc_domain_save(xc_interface *xch, int io_fd, uint32_t dom,
                   uint32_t flags, struct save_callbacks *callbacks,
                   xc_stream_type_t stream_type, int recv_fd)
{
    struct save_ctx ctx;
    int dt = env_domtype();

    memset(&ctx, 0, sizeof(ctx));
    ctx.xch = xch;
    ctx.fd = io_fd;
    ctx.recv_fd = recv_fd;
    ctx.domid = dom;
    ctx.cb = callbacks;
    ctx.stream_type = stream_type;
    ctx.live = !!(flags & XCFLAGS_LIVE);
    ctx.debug = !!(flags & XCFLAGS_DEBUG);
    ctx.hvm = (dt != 0);                      /* default HVM */
    ctx.nr_pages = env_long("XC_STANDIN_PAGES", 4, 0, 1L << 20);
    ctx.nr_dirty = env_long("XC_STANDIN_DIRTY", 2, 0, 1L << 20);
    ctx.max_checkpoints = env_long("XC_STANDIN_MAX_CHECKPOINTS", -1, 0,
                                   1L << 30);
    ctx.xtab_pfn = ctx.nr_pages;
    ctx.p2m_size = ctx.nr_pages + 1;

    /* Sanity check stream_type-related parameters (xg_sr_save.c). */
    switch ( stream_type )
    {
    case XC_STREAM_COLO:
        if ( !callbacks->wait_checkpoint )
            standin_assert_fail("xc_domain_save", "xg_sr_save.c", 1015,
                                "callbacks->wait_checkpoint",
                                "wait_checkpoint");
        /* Fallthrough */
    case XC_STREAM_REMUS:
        if ( !(callbacks->checkpoint && callbacks->postcopy) )
            standin_assert_fail("xc_domain_save", "xg_sr_save.c", 1018,
                                "callbacks->checkpoint && callbacks->postcopy",
                                !callbacks->checkpoint
                                ? (!callbacks->postcopy ? "checkpoint postcopy"
                                                        : "checkpoint")
                                : "postcopy");
        /* Fallthrough */
    case XC_STREAM_PLAIN:
        if ( ctx.hvm && !callbacks->switch_qemu_logdirty )
            standin_assert_fail("xc_domain_save", "xg_sr_save.c", 1022,
                                "callbacks->switch_qemu_logdirty",
                                "switch_qemu_logdirty");
        break;
    default:
        standin_assert_fail("xc_domain_save", "xg_sr_save.c", 1026,
                            "!\"Bad stream_type\"", "(bad stream_type)");
    }

    /* Every save calls suspend (not asserted by libxc: it would crash). */
    if ( !callbacks->suspend )
        standin_assert_fail("xc_domain_save", "xc_standin.c", __LINE__,
                            "callbacks->suspend", "suspend");

    DPRINTF("fd %d, dom %u, flags %u, hvm %d", io_fd, dom, flags,
            ctx.hvm ? 1 : 0);
    DBGPRINTF("xc_standin: save stream_type %d recv_fd %d pages %lu dirty %lu"
              " max_checkpoints %ld", (int)stream_type, recv_fd,
              ctx.nr_pages, ctx.nr_dirty, ctx.max_checkpoints);

    return save_run(&ctx);
}

/* ------------------------------------------------------------------ */
/* RESTORE                                                             */

struct restore_ctx {
    xc_interface *xch;
    int fd;
    int send_back_fd;
    uint32_t domid;
    xc_stream_type_t stream_type;
    struct restore_callbacks *cb;
    unsigned store_evtchn, console_evtchn;
    uint32_t store_domid, console_domid;

    bool hvm;                       /* type of the "domain" */
    unsigned format_version;
    uint32_t guest_type;
    unsigned guest_page_size;

    bool seen_static_data_end;
    bool buffer_all_records;
    bool verify;

    struct si_rec *buffered;
    unsigned nr_buffered, nr_alloc;

    /* "Applied" guest state. */
    bool have_cpuid, have_msr;
    size_t hvm_context_size;
    bool seen_pv_info;
    unsigned pv_width, pv_levels;
    bool seen_p2m_frames;
    uint64_t pv_max_pfn;
    bool have_vcpu0_basic;
    uint64_t xenstore_gfn, console_gfn;
    uint64_t max_pfn_seen;
    bool any_pfn_seen;

    /* Statistics. */
    uint64_t pages_applied, pages_verified, records_applied;
    unsigned checkpoints;
};

static int restore_process_record(struct restore_ctx *ctx,
                                  struct si_rec *rec);

/* handle_static_data_end() of xg_sr_restore.c (including its precedence
 * slip: a non-zero callback reply makes rc == 1). */
static int restore_handle_static_data_end(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    unsigned missing = 0;
    int rc = 0;

    if ( ctx->seen_static_data_end )
    {
        ERROR("Multiple STATIC_DATA_END records found");
        return -1;
    }
    ctx->seen_static_data_end = true;

    if ( !ctx->have_cpuid )
        missing |= XGR_SDD_MISSING_CPUID;
    if ( !ctx->have_msr )
        missing |= XGR_SDD_MISSING_MSR;

    if ( ctx->cb->static_data_done &&
         (rc = (ctx->cb->static_data_done(missing, ctx->cb->data) != 0)) )
        ERROR("static_data_done() callback failed: %d\n", rc);

    return rc;
}

/* v2 streams have no STATIC_DATA_END: libxc infers it at the first PAGE_DATA or
 * X86_PV_P2M_FRAMES (xg_sr_restore.c L320-343); either way it must precede them. */
static int restore_require_static_data_end(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    int rc;

    if ( ctx->format_version < 3 && !ctx->seen_static_data_end )
    {
        rc = restore_handle_static_data_end(ctx);
        if ( rc )
        {
            ERROR("Inferred STATIC_DATA_END record failed");
            return rc;
        }
    }
    if ( !ctx->seen_static_data_end )
    {
        ERROR("No STATIC_DATA_END seen");
        return -1;
    }
    return 0;
}

static bool known_page_type(uint32_t t)
{
    switch ( t )
    {
    case PT_NOTAB:
    case 0x1: case 0x1 | PT_LPINTAB:
    case 0x2: case 0x2 | PT_LPINTAB:
    case 0x3: case 0x3 | PT_LPINTAB:
    case 0x4: case 0x4 | PT_LPINTAB:
    case PT_XTAB: case PT_XALLOC: case PT_BROKEN:
        return true;
    default:
        return false;
    }
}

static bool page_type_has_data(uint32_t t)
{
    return known_page_type(t) && t != PT_XTAB && t != PT_XALLOC &&
        t != PT_BROKEN;
}

/* handle_page_data() of xg_sr_restore.c (validation only). */
static int restore_handle_page_data(struct restore_ctx *ctx,
                                    struct si_rec *rec)
{
    xc_interface *xch = ctx->xch;
    uint32_t count, type, i, with_data = 0;
    uint64_t word, pfn;
    const uint8_t *d = rec->data;
    int rc;

    rc = restore_require_static_data_end(ctx);
    if ( rc )
        return rc;
    if ( rec->length < 8 )
    {
        ERROR("PAGE_DATA record truncated: length %u, min %zu",
              rec->length, (size_t)8);
        return -1;
    }
    memcpy(&count, d, 4);
    if ( count < 1 )
    {
        ERROR("Expected at least 1 pfn in PAGE_DATA record");
        return -1;
    }
    if ( rec->length < 8 + (uint64_t)count * 8 )
    {
        ERROR("PAGE_DATA record (length %u) too short to contain %u"
              " pfns worth of information", rec->length, count);
        return -1;
    }

    for ( i = 0; i < count; i++ )
    {
        memcpy(&word, d + 8 + 8 * (size_t)i, 8);
        pfn = word & PAGE_DATA_PFN_MASK;
        if ( !ctx->hvm && ctx->seen_p2m_frames && pfn > ctx->pv_max_pfn )
        {
            ERROR("pfn %#" PRIx64 " (index %u) outside domain maximum",
                  pfn, i);
            return -1;
        }
        type = (uint32_t)((word & PAGE_DATA_TYPE_MASK) >> 60);
        if ( !known_page_type(type) )
        {
            ERROR("Unknown type %#" PRIx32 " for pfn %#" PRIx64
                  " (index %u)", type << 28, pfn, i);
            return -1;
        }
        if ( page_type_has_data(type) )
            with_data++;
    }

    if ( rec->length != 8 + (uint64_t)count * 8 +
         (uint64_t)SI_PAGE_SIZE * with_data )
    {
        ERROR("PAGE_DATA record wrong size: length %u, expected "
              "%zu + %zu + %lu", rec->length, (size_t)8, (size_t)count * 8,
              (unsigned long)SI_PAGE_SIZE * with_data);
        return -1;
    }

    for ( i = 0; i < count; i++ )
    {
        memcpy(&word, d + 8 + 8 * (size_t)i, 8);
        pfn = word & PAGE_DATA_PFN_MASK;
        if ( !ctx->any_pfn_seen || pfn > ctx->max_pfn_seen )
            ctx->max_pfn_seen = pfn;
        ctx->any_pfn_seen = true;
    }
    if ( ctx->verify )
        ctx->pages_verified += with_data;
    else
        ctx->pages_applied += with_data;
    return 0;
}

static int restore_hvm_params(struct restore_ctx *ctx, struct si_rec *rec)
{
    xc_interface *xch = ctx->xch;
    uint32_t count, i;
    uint64_t idx, val;
    const uint8_t *d = rec->data;

    if ( rec->length < 8 )
    {
        ERROR("HVM_PARAMS record truncated: length %u, header size %zu",
              rec->length, (size_t)8);
        return -1;
    }
    memcpy(&count, d, 4);
    if ( rec->length != 8 + (uint64_t)count * 16 )
    {
        ERROR("HVM_PARAMS record truncated: header %zu, count %u, "
              "expected len %zu, got %u", (size_t)8, count,
              (size_t)count * 16, rec->length);
        return -1;
    }
    if ( count == 0 )
    {
        DBGPRINTF("Skipping empty HVM_PARAMS record\n");
        return 0;
    }
    for ( i = 0; i < count; i++ )
    {
        memcpy(&idx, d + 8 + 16 * (size_t)i, 8);
        memcpy(&val, d + 16 + 16 * (size_t)i, 8);
        if ( idx == HVM_PARAM_CONSOLE_PFN )
            ctx->console_gfn = val;
        else if ( idx == HVM_PARAM_STORE_PFN )
            ctx->xenstore_gfn = val;
    }
    return 0;
}

static int restore_vcpu_blob(struct restore_ctx *ctx, struct si_rec *rec)
{
    xc_interface *xch = ctx->xch;
    const char *name = rec_type_str(rec->type);
    uint32_t vcpu_id;
    size_t blobsz;

    if ( rec->length < 8 )
    {
        ERROR("%s record truncated: length %u, header size %zu",
              name, rec->length, (size_t)8);
        return -1;
    }
    blobsz = rec->length - 8;
    memcpy(&vcpu_id, rec->data, 4);
    if ( blobsz == 0 )
    {
        DBGPRINTF("Skipping empty %s record for vcpu %u\n", name, vcpu_id);
        return 0;
    }
    if ( vcpu_id >= 128 )   /* stand-in domain: max_vcpu_id 127 */
    {
        ERROR("%s record vcpu_id (%u) exceeds domain max (%u)",
              name, vcpu_id, 127);
        return -1;
    }
    switch ( rec->type )
    {
    case REC_TYPE_X86_PV_VCPU_BASIC:
        if ( ctx->pv_width == 8 && blobsz != sizeof(vcpu_guest_context_t) )
        {
            ERROR("%s record wrong size: expected %zu, got %u", name,
                  8 + sizeof(vcpu_guest_context_t), rec->length);
            return -1;
        }
        if ( vcpu_id == 0 )
            ctx->have_vcpu0_basic = true;
        break;
    case REC_TYPE_X86_PV_VCPU_EXTENDED:
        if ( blobsz > 128 )
        {
            ERROR("%s record too long: max %zu, got %u", name,
                  (size_t)8 + 128, rec->length);
            return -1;
        }
        break;
    case REC_TYPE_X86_PV_VCPU_XSAVE:
        if ( blobsz < 16 )
        {
            ERROR("%s record too short: min %zu, got %u", name,
                  (size_t)8 + 16, rec->length);
            return -1;
        }
        break;
    case REC_TYPE_X86_PV_VCPU_MSRS:
        if ( blobsz % 16 )
        {
            ERROR("%s record payload size %zu expected to be a multiple of"
                  " %zu", name, blobsz, (size_t)16);
            return -1;
        }
        break;
    }
    return 0;
}

/* restore_ops.process_record for the x86 HVM / PV stand-in domain. */
static int restore_arch_record(struct restore_ctx *ctx, struct si_rec *rec)
{
    xc_interface *xch = ctx->xch;

    switch ( rec->type )
    {
    case REC_TYPE_X86_TSC_INFO:
        if ( rec->length != 24 )
        {
            ERROR("X86_TSC_INFO record wrong size: length %u, expected %zu",
                  rec->length, (size_t)24);
            return -1;
        }
        return 0;

    case REC_TYPE_X86_CPUID_POLICY:
        if ( rec->length == 0 || rec->length % sizeof(xen_cpuid_leaf_t) )
        {
            ERROR("X86_CPUID_POLICY size %u should be multiple of %zu",
                  rec->length, sizeof(xen_cpuid_leaf_t));
            return -1;
        }
        ctx->have_cpuid = true;
        return 0;

    case REC_TYPE_X86_MSR_POLICY:
        if ( rec->length == 0 || rec->length % sizeof(xen_msr_entry_t) )
        {
            ERROR("X86_MSR_POLICY size %u should be multiple of %zu",
                  rec->length, sizeof(xen_cpuid_leaf_t));
            return -1;
        }
        ctx->have_msr = true;
        return 0;
    }

    if ( ctx->hvm )
    {
        switch ( rec->type )
        {
        case REC_TYPE_HVM_CONTEXT:
            if ( rec->length == 0 )
            {
                errno = EINVAL;
                ERROR("Unable to allocate %u bytes for hvm context",
                      rec->length);
                return -1;
            }
            ctx->hvm_context_size = rec->length;
            return 0;
        case REC_TYPE_HVM_PARAMS:
            return restore_hvm_params(ctx, rec);
        default:
            return RECORD_NOT_PROCESSED;
        }
    }

    switch ( rec->type )
    {
    case REC_TYPE_X86_PV_INFO:
    {
        const uint8_t *info = rec->data;

        if ( ctx->seen_pv_info )
        {
            ERROR("Already received X86_PV_INFO record");
            return -1;
        }
        if ( rec->length < 8 )
        {
            ERROR("X86_PV_INFO record truncated: length %u, expected %zu",
                  rec->length, (size_t)8);
            return -1;
        }
        if ( !((info[0] == 8 && info[1] == 4) ||
               (info[0] == 4 && info[1] == 3)) )
        {
            ERROR("Invalid X86_PV_INFO combination: width %u, pt_levels %u",
                  info[0], info[1]);
            return -1;
        }
        ctx->pv_width = info[0];
        ctx->pv_levels = info[1];
        ctx->seen_pv_info = true;
        return 0;
    }

    case REC_TYPE_X86_PV_P2M_FRAMES:
    {
        uint32_t start, end, fpp, s, e;
        int rc;

        rc = restore_require_static_data_end(ctx);
        if ( rc )
            return rc;
        if ( !ctx->seen_pv_info )
        {
            ERROR("Not yet received X86_PV_INFO record");
            return -1;
        }
        if ( rec->length < 8 )
        {
            ERROR("X86_PV_P2M_FRAMES record truncated: length %u, min %zu",
                  rec->length, (size_t)16);
            return -1;
        }
        memcpy(&start, rec->data, 4);
        memcpy(&end, (uint8_t *)rec->data + 4, 4);
        if ( start > end )
        {
            ERROR("End pfn in stream (%#x) exceeds Start (%#x)", end, start);
            return -1;
        }
        fpp = SI_PAGE_SIZE / ctx->pv_width;
        s = start / fpp;
        e = end / fpp + 1;
        if ( rec->length != 8 + (uint64_t)(e - s) * 8 )
        {
            ERROR("X86_PV_P2M_FRAMES record wrong size: start_pfn %#x"
                  ", end_pfn %#x, length %u, expected %zu + (%u - %u) * %zu",
                  start, end, rec->length, (size_t)8, e, s, (size_t)8);
            return -1;
        }
        if ( !ctx->seen_p2m_frames || end > ctx->pv_max_pfn )
            ctx->pv_max_pfn = end;
        ctx->seen_p2m_frames = true;
        return 0;
    }

    case REC_TYPE_X86_PV_VCPU_BASIC:
    case REC_TYPE_X86_PV_VCPU_EXTENDED:
    case REC_TYPE_X86_PV_VCPU_XSAVE:
    case REC_TYPE_X86_PV_VCPU_MSRS:
        return restore_vcpu_blob(ctx, rec);

    case REC_TYPE_SHARED_INFO:
        if ( !ctx->seen_pv_info )
        {
            ERROR("Not yet received X86_PV_INFO record");
            return -1;
        }
        if ( rec->length != SI_PAGE_SIZE )
        {
            ERROR("X86_PV_SHARED_INFO record wrong size: length %u"
                  ", expected 4096", rec->length);
            return -1;
        }
        return 0;

    default:
        return RECORD_NOT_PROCESSED;
    }
}

/* restore_ops.stream_complete: what the stand-in can check. */
static int restore_stream_complete(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;

    if ( ctx->hvm )
    {
        if ( !ctx->hvm_context_size )
        {
            errno = EINVAL;
            PERROR("Unable to restore HVM context");
            return -1;
        }
        return 0;
    }

    if ( !ctx->have_vcpu0_basic )
    {
        ERROR("Sender didn't send vcpu0's basic state");
        return -1;
    }
    /* PV: libxc reads these from the guest's start_info page. */
    ctx->xenstore_gfn = STANDIN_STORE_GFN;
    ctx->console_gfn = STANDIN_CONSOLE_GFN;
    return 0;
}

/* send_checkpoint_dirty_pfn_list() of xg_sr_restore.c. */
static int restore_send_dirty_pfn_list(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    long want = env_long("XC_STANDIN_SVM_DIRTY", 2, 0, 1L << 20);
    uint64_t p2m_size = ctx->any_pfn_seen ? ctx->max_pfn_seen + 1 : 0;
    uint64_t count = (uint64_t)want < p2m_size ? (uint64_t)want : p2m_size;
    uint64_t i, *pfns;
    uint32_t hdr[2];
    int rc;

    pfns = malloc((count + 1) * sizeof(*pfns));
    if ( !pfns )
    {
        ERROR("Unable to allocate %zu bytes of memory for dirty pfn list",
              (size_t)(count * sizeof(*pfns)));
        return -1;
    }
    /* Distinct pfns 1, 2, ... (wrapping to 0), in ascending order. */
    for ( i = 0; i < count; i++ )
        pfns[i] = (i + 1 < p2m_size) ? i + 1 : 0;
    if ( count && pfns[count - 1] == 0 )
    {
        memmove(pfns + 1, pfns, (count - 1) * sizeof(*pfns));
        pfns[0] = 0;
    }

    hdr[0] = REC_TYPE_CHECKPOINT_DIRTY_PFN_LIST;
    hdr[1] = (uint32_t)(count * sizeof(*pfns));

    rc = si_write_exact(ctx->send_back_fd, hdr, sizeof(hdr));
    if ( !rc && count )
        rc = si_write_exact(ctx->send_back_fd, pfns, count * sizeof(*pfns));
    free(pfns);
    if ( rc )
    {
        PERROR("Failed to write dirty bitmap to stream");
        return -1;
    }
    DBGPRINTF("xc_standin: sent %" PRIu64 " dirty pfn(s) on the back channel",
              count);
    return 0;
}

static int restore_buffer_record(struct restore_ctx *ctx, struct si_rec *rec)
{
    xc_interface *xch = ctx->xch;

    if ( ctx->nr_buffered >= ctx->nr_alloc )
    {
        unsigned n = ctx->nr_alloc + 1024;
        struct si_rec *p = realloc(ctx->buffered, n * sizeof(*p));

        if ( !p )
        {
            ERROR("Failed to realloc memory for buffered records");
            return -1;
        }
        ctx->buffered = p;
        ctx->nr_alloc = n;
    }
    ctx->buffered[ctx->nr_buffered++] = *rec;
    return 0;
}

/* handle_checkpoint() of xg_sr_restore.c. */
static int restore_handle_checkpoint(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    int rc = 0, ret;
    unsigned i;

    if ( ctx->stream_type == XC_STREAM_PLAIN )
    {
        ERROR("Found checkpoint in non-checkpointed stream");
        return -1;
    }

    ret = ctx->cb->checkpoint(ctx->cb->data);
    switch ( ret )
    {
    case XGR_CHECKPOINT_SUCCESS:
        break;
    case XGR_CHECKPOINT_FAILOVER:
        if ( ctx->buffer_all_records )
            return BROKEN_CHANNEL;
        /* We don't have a consistent state */
        return -1;
    default:
        return -1;
    }

    ctx->checkpoints++;

    if ( ctx->buffer_all_records )
    {
        IPRINTF("All records buffered");
        for ( i = 0; i < ctx->nr_buffered; i++ )
        {
            rc = restore_process_record(ctx, &ctx->buffered[i]);
            if ( rc )
                return rc;
        }
        ctx->nr_buffered = 0;
        IPRINTF("All records processed");
    }
    else
        ctx->buffer_all_records = true;

    if ( ctx->stream_type == XC_STREAM_COLO )
    {
#define HANDLE_CB(ret) do {                          \
            if ( (ret) == 1 )                        \
                rc = 0;                              \
            else                                     \
                return ((ret) == 2) ? BROKEN_CHANNEL : -1; \
        } while ( 0 )

        rc = restore_stream_complete(ctx);
        if ( rc )
            return rc;

        ctx->cb->restore_results(ctx->xenstore_gfn, ctx->console_gfn,
                                 ctx->cb->data);

        ret = ctx->cb->postcopy(ctx->cb->data);
        HANDLE_CB(ret);

        ret = ctx->cb->wait_checkpoint(ctx->cb->data);
        HANDLE_CB(ret);

        ret = ctx->cb->suspend(ctx->cb->data);
        HANDLE_CB(ret);
#undef HANDLE_CB

        rc = restore_send_dirty_pfn_list(ctx);
    }
    return rc;
}

/* process_record() of xg_sr_restore.c. */
static int restore_process_record(struct restore_ctx *ctx,
                                  struct si_rec *rec)
{
    xc_interface *xch = ctx->xch;
    int rc = 0;

    switch ( rec->type )
    {
    case REC_TYPE_END:
        break;
    case REC_TYPE_PAGE_DATA:
        rc = restore_handle_page_data(ctx, rec);
        break;
    case REC_TYPE_VERIFY:
        DPRINTF("Verify mode enabled");
        ctx->verify = true;
        break;
    case REC_TYPE_CHECKPOINT:
        rc = restore_handle_checkpoint(ctx);
        break;
    case REC_TYPE_STATIC_DATA_END:
        rc = restore_handle_static_data_end(ctx);
        break;
    default:
        rc = restore_arch_record(ctx, rec);
        break;
    }
    if ( rc == 0 )
        ctx->records_applied++;

    free(rec->data);
    rec->data = NULL;
    return rc;
}

/* restore() of xg_sr_restore.c. */
static int restore_run(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    struct si_rec rec;
    int rc, saved_rc = 0, saved_errno = 0;
    unsigned i;

    IPRINTF("Restoring domain");

    /* setup(): restore_ops.setup checks the stream matches the domain. */
    if ( ctx->hvm && ctx->guest_type != DHDR_TYPE_X86_HVM )
    {
        ERROR("Unable to restore %s domain into an x86 HVM domain",
              dhdr_type_str(ctx->guest_type));
        rc = -1;
        goto err;
    }
    if ( !ctx->hvm && ctx->guest_type != DHDR_TYPE_X86_PV )
    {
        ERROR("Unable to restore %s domain into an x86_pv domain",
              dhdr_type_str(ctx->guest_type));
        rc = -1;
        goto err;
    }
    if ( ctx->guest_page_size != SI_PAGE_SIZE )
    {
        ERROR("Invalid page size %u for %s domains", ctx->guest_page_size,
              ctx->hvm ? "x86 HVM" : "x86_pv");
        rc = -1;
        goto err;
    }

    do
    {
        rc = si_read_record(xch, ctx->fd, &rec);
        if ( rc )
        {
            if ( ctx->buffer_all_records )
                goto remus_failover;
            else
                goto err;
        }

        if ( ctx->buffer_all_records &&
             rec.type != REC_TYPE_END &&
             rec.type != REC_TYPE_CHECKPOINT )
        {
            rc = restore_buffer_record(ctx, &rec);
            if ( rc )
            {
                free(rec.data);
                goto err;
            }
        }
        else
        {
            rc = restore_process_record(ctx, &rec);
            if ( rc == RECORD_NOT_PROCESSED )
            {
                if ( rec.type & REC_TYPE_OPTIONAL )
                    DPRINTF("Ignoring optional record %#x (%s)",
                            rec.type, rec_type_str(rec.type));
                else
                {
                    ERROR("Mandatory record %#x (%s) not handled",
                          rec.type, rec_type_str(rec.type));
                    rc = -1;
                    goto err;
                }
            }
            else if ( rc == BROKEN_CHANNEL )
                goto remus_failover;
            else if ( rc )
                goto err;
        }
    } while ( rec.type != REC_TYPE_END );

 remus_failover:
    if ( ctx->stream_type == XC_STREAM_COLO )
    {
        /* With COLO, we have already called stream_complete */
        rc = 0;
        IPRINTF("COLO Failover");
        goto done;
    }

    rc = restore_stream_complete(ctx);
    if ( rc )
        goto err;

    IPRINTF("Restore successful");
    goto done;

 err:
    saved_errno = errno;
    saved_rc = rc;
    PERROR("Restore failed");

 done:
    DBGPRINTF("xc_standin: restore summary: records applied %" PRIu64
              ", pages applied %" PRIu64 ", checkpoints %u, records discarded"
              " %u, rc %d", ctx->records_applied, ctx->pages_applied,
              ctx->checkpoints, ctx->nr_buffered, saved_rc ? saved_rc : rc);

    for ( i = 0; i < ctx->nr_buffered; i++ )
        free(ctx->buffered[i].data);
    free(ctx->buffered);
    ctx->buffered = NULL;

    if ( saved_rc )
    {
        rc = saved_rc;
        errno = saved_errno;
    }
    return rc;
}

/* read_headers() of xg_sr_restore.c. */
static int restore_read_headers(struct restore_ctx *ctx)
{
    xc_interface *xch = ctx->xch;
    uint8_t ihdr[24], dhdr[16];
    uint64_t marker;
    uint32_t id, version, type, major, minor;
    uint16_t options, page_shift;

    if ( si_read_exact(ctx->fd, ihdr, sizeof(ihdr)) )
    {
        PERROR("Failed to read Image Header from stream");
        return -1;
    }
    memcpy(&marker, ihdr, 8);
    memcpy(&id, ihdr + 8, 4);       id = ntohl(id);
    memcpy(&version, ihdr + 12, 4); version = ntohl(version);
    memcpy(&options, ihdr + 16, 2); options = ntohs(options);

    if ( marker != IHDR_MARKER )
    {
        ERROR("Invalid marker: Got 0x%016" PRIx64, marker);
        return -1;
    }
    if ( id != IHDR_ID )
    {
        ERROR("Invalid ID: Expected 0x%08x, Got 0x%08x", IHDR_ID, id);
        return -1;
    }
    if ( version < 2 || version > 3 )
    {
        ERROR("Invalid Version: Expected 2 <= ver <= 3, Got %d", (int)version);
        return -1;
    }
    if ( options & IHDR_OPT_BIG_ENDIAN )
    {
        ERROR("Unable to handle big endian streams");
        return -1;
    }
    ctx->format_version = version;

    if ( si_read_exact(ctx->fd, dhdr, sizeof(dhdr)) )
    {
        PERROR("Failed to read Domain Header from stream");
        return -1;
    }
    memcpy(&type, dhdr, 4);
    memcpy(&page_shift, dhdr + 4, 2);
    memcpy(&major, dhdr + 8, 4);
    memcpy(&minor, dhdr + 12, 4);
    ctx->guest_type = type;
    ctx->guest_page_size = page_shift < 32 ? (1u << page_shift) : 0;

    if ( major == 0 )
    {
        IPRINTF("Found %s domain, converted from legacy stream format",
                dhdr_type_str(type));
        DPRINTF("  Legacy conversion script version %u", minor);
    }
    else
        IPRINTF("Found %s domain from Xen %u.%u", dhdr_type_str(type),
                major, minor);
    return 0;
}

int xc_domain_restore(xc_interface *xch, int io_fd, uint32_t dom,
                      unsigned int store_evtchn, unsigned long *store_mfn,
                      uint32_t store_domid, unsigned int console_evtchn,
                      unsigned long *console_mfn, uint32_t console_domid,
                      xc_stream_type_t stream_type,
                      struct restore_callbacks *callbacks, int send_back_fd)
{
    struct restore_ctx ctx;
    int dt = env_domtype();

    memset(&ctx, 0, sizeof(ctx));
    ctx.xch = xch;
    ctx.fd = io_fd;
    ctx.send_back_fd = send_back_fd;
    ctx.domid = dom;
    ctx.stream_type = stream_type;
    ctx.cb = callbacks;
    ctx.store_evtchn = store_evtchn;
    ctx.store_domid = store_domid;
    ctx.console_evtchn = console_evtchn;
    ctx.console_domid = console_domid;

    /* Sanity check stream_type-related parameters (xg_sr_restore.c). */
    switch ( stream_type )
    {
    case XC_STREAM_COLO:
        if ( !(callbacks->suspend && callbacks->postcopy &&
               callbacks->wait_checkpoint && callbacks->restore_results) )
        {
            char missing[96] = "";

            if ( !callbacks->suspend )
                strcat(missing, "suspend ");
            if ( !callbacks->postcopy )
                strcat(missing, "postcopy ");
            if ( !callbacks->wait_checkpoint )
                strcat(missing, "wait_checkpoint ");
            if ( !callbacks->restore_results )
                strcat(missing, "restore_results ");
            missing[strlen(missing) - 1] = '\0';
            standin_assert_fail("xc_domain_restore", "xg_sr_restore.c", 887,
                                "callbacks->suspend && callbacks->postcopy && "
                                "callbacks->wait_checkpoint && "
                                "callbacks->restore_results", missing);
        }
        /* Fallthrough */
    case XC_STREAM_REMUS:
        if ( !callbacks->checkpoint )
            standin_assert_fail("xc_domain_restore", "xg_sr_restore.c", 893,
                                "callbacks->checkpoint", "checkpoint");
        /* Fallthrough */
    case XC_STREAM_PLAIN:
        break;
    default:
        standin_assert_fail("xc_domain_restore", "xg_sr_restore.c", 899,
                            "!\"Bad stream_type\"", "(bad stream_type)");
    }

    /* The "domain": XC_STANDIN_DOMTYPE if set, else whatever the stream
     * says (decided after the headers are read). */
    DBGPRINTF("xc_standin: restore stream_type %d send_back_fd %d "
              "store_evtchn %u store_domid %u console_evtchn %u "
              "console_domid %u", (int)stream_type, send_back_fd,
              store_evtchn, store_domid, console_evtchn, console_domid);

    if ( restore_read_headers(&ctx) )
        return -1;

    ctx.hvm = (dt >= 0) ? (dt == 1) : (ctx.guest_type != DHDR_TYPE_X86_PV);
    DPRINTF("fd %d, dom %u, hvm %u, stream_type %d", io_fd, dom,
            ctx.hvm ? 1u : 0u, (int)stream_type);

    if ( restore_run(&ctx) )
        return -1;

    IPRINTF("XenStore: mfn %#" PRIx64 ", dom %d, evt %u", ctx.xenstore_gfn,
            (int)ctx.store_domid, ctx.store_evtchn);
    IPRINTF("Console: mfn %#" PRIx64 ", dom %d, evt %u", ctx.console_gfn,
            (int)ctx.console_domid, ctx.console_evtchn);

    *console_mfn = ctx.console_gfn;
    *store_mfn = ctx.xenstore_gfn;
    return 0;
}
