/* densevm workload guest: a freestanding x86-64 program started by densevm in 64-bit
 * mode at CPL 3. It fills its data pages from a scenario (zero, shared-by-seed and
 * unique pages), rewrites a chosen fraction at a chosen rate, verifies every page
 * against what it last wrote, and reports through a report page plus an MMIO
 * doorbell. Content of page i at version v is derived from (seed, i, v). */
#include "abi.h"

#define PAGE_WORDS 512
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define WRITE_SALT 0x5752495445534554ULL

enum kind { KIND_ZERO, KIND_SHARED, KIND_UNIQUE };

/* Per-vCPU environment: a private copy of this vCPU's config page plus its report
 * page. Every vCPU runs this same program on its own slice of the data pages. */
struct env {
    struct workload_config c;
    volatile struct workload_report *rep;
};

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *d, int c, unsigned long n) {
    unsigned char *p = d;
    while (n--) *p++ = (unsigned char)c;
    return d;
}
void *memcpy(void *d, const void *s, unsigned long n) {
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void doorbell(const struct env *e, uint64_t cmd, uint64_t arg) {
    *(volatile uint64_t *)e->c.doorbell_gpa = cmd | (arg << 8);
}

/* Console output: port I/O is not allowed at CPL 3 on every host (it #GPs under
 * this platform's KVM even with IOPL 3), so lines go out through the doorbell, one
 * exit per line. */
struct line {
    char buf[120];
    int len;
};

static void line_str(struct line *l, const char *s) {
    while (*s && l->len < (int)sizeof(l->buf) - 1) l->buf[l->len++] = *s++;
}

static void line_u64(struct line *l, uint64_t v) {
    char tmp[24];
    int i = 23;
    tmp[i] = 0;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    line_str(l, &tmp[i]);
}

static void line_send(const struct env *e, struct line *l) {
    l->buf[l->len] = 0;
    if (e->c.serial) doorbell(e, DB_PUTS, (uint64_t)l->buf);
    l->len = 0;
}

static enum kind page_kind(const struct env *e, uint64_t i) {
    uint64_t r = mix64(e->c.shared_seed ^ ((e->c.page_base + i) * GOLDEN)) >> 32;
    if (r < e->c.zero_thr) return KIND_ZERO;
    if (r < e->c.zero_thr + e->c.shared_thr) return KIND_SHARED;
    return KIND_UNIQUE;
}

static int in_write_set(const struct env *e, uint64_t i) {
    return (mix64(e->c.seed ^ WRITE_SALT ^ ((e->c.page_base + i) * GOLDEN)) >> 32) < e->c.write_thr;
}

static inline uint64_t *page_ptr(const struct env *e, uint64_t i) {
    return (uint64_t *)(e->c.data_gpa + (i << 12));
}

static inline volatile uint32_t *versions(const struct env *e) {
    return (volatile uint32_t *)e->c.versions_gpa;
}

/* The seed-derived key of page i at version v, or 0 for a zero page. */
static uint64_t page_key(const struct env *e, uint64_t i, uint32_t v) {
    uint64_t seed;
    if (v == 0) {
        enum kind k = page_kind(e, i);
        if (k == KIND_ZERO) return 0;
        seed = k == KIND_SHARED ? e->c.shared_seed : e->c.seed;
    } else {
        seed = e->c.seed;
    }
    return mix64(seed ^ mix64((e->c.page_base + i) * GOLDEN + ((uint64_t)v << 40) + 1)) | 1;
}

/* Writes the content for key into page p; returns the cycles of the first store. */
static uint64_t fill_page(uint64_t *p, uint64_t key) {
    uint64_t x = key;
    uint64_t t0 = rdtsc();
    p[0] = x;
    uint64_t t1 = rdtsc();
    if (key == 0) {
        for (int j = 1; j < PAGE_WORDS; j++) p[j] = 0;
        return t1 - t0;
    }
    for (int j = 1; j < PAGE_WORDS; j++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[j] = x;
    }
    return t1 - t0;
}

static int page_matches(const uint64_t *p, uint64_t key) {
    uint64_t x = key;
    if (p[0] != x) return 0;
    if (key == 0) {
        for (int j = 1; j < PAGE_WORDS; j++)
            if (p[j] != 0) return 0;
        return 1;
    }
    for (int j = 1; j < PAGE_WORDS; j++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (p[j] != x) return 0;
    }
    return 1;
}

static void verify_page(const struct env *e, uint64_t i) {
    if (!page_matches(page_ptr(e, i), page_key(e, i, versions(e)[i]))) {
        e->rep->mismatches = e->rep->mismatches + 1;
        if (e->rep->first_mismatch == 0) e->rep->first_mismatch = e->c.page_base + i + 1;
        doorbell(e, DB_MISMATCH, e->c.page_base + i);
    }
    e->rep->pages_verified = e->rep->pages_verified + 1;
}

static void verify_all(const struct env *e) {
    uint64_t n = e->c.npages;
    for (uint64_t i = 0; i < n; i++) verify_page(e, i);
    e->rep->full_verifies = e->rep->full_verifies + 1;
}

static void rewrite_page(const struct env *e, uint64_t i) {
    uint32_t v = versions(e)[i] + 1;
    if (v == 0) v = 1; /* version 0 means "as filled" */
    uint64_t t0 = rdtsc();
    uint64_t first = fill_page(page_ptr(e, i), page_key(e, i, v));
    uint64_t dt = rdtsc() - t0;
    versions(e)[i] = v;
    e->rep->pages_written = e->rep->pages_written + 1;
    e->rep->write_cycles_sum = e->rep->write_cycles_sum + dt;
    if (dt > e->rep->write_cycles_max) e->rep->write_cycles_max = dt;
    e->rep->write_first_cycles_sum = e->rep->write_first_cycles_sum + first;
    if (first > e->rep->write_first_cycles_max) e->rep->write_first_cycles_max = first;
}

/* A minimal virtio-mmio balloon driver (virtio 1.x, split rings), used by vCPU 0
 * when densevm gives it a balloon step. It runs at CPL 3 without interrupts, so it
 * polls the used rings (sleeping through the doorbell between polls). The rings,
 * the PFN buffer and the statistics buffer live in cfg.balloon_scratch_gpa (16
 * pages, identity-mapped). */
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC 0x080
#define VMMIO_QUEUE_AVAIL 0x090
#define VMMIO_QUEUE_USED 0x0a0
#define VMMIO_CONFIG 0x100
#define VSTATUS_ACK 1
#define VSTATUS_DRIVER 2
#define VSTATUS_DRIVER_OK 4
#define VSTATUS_FEATURES_OK 8
#define VQ_SIZE 16
#define PFNS_PER_BUF 256
#define HOLD_POLL_US 50000 /* the hold's polling period (interrupt status, statistics) */

struct vq {
    uint64_t desc, avail, used;
    uint16_t idx;
};

static inline uint32_t mmio_r(uint64_t base, uint64_t off) { return *(volatile uint32_t *)(base + off); }
static inline void mmio_w(uint64_t base, uint64_t off, uint32_t v) { *(volatile uint32_t *)(base + off) = v; }

static void vq_setup(uint64_t base, uint32_t index, struct vq *q, uint64_t mem) {
    memset((void *)mem, 0, 0x3000);
    q->desc = mem;
    q->avail = mem + 0x1000;
    q->used = mem + 0x2000;
    q->idx = 0;
    mmio_w(base, VMMIO_QUEUE_SEL, index);
    mmio_w(base, VMMIO_QUEUE_NUM, VQ_SIZE);
    uint64_t a[3] = {q->desc, q->avail, q->used};
    for (int i = 0; i < 3; i++) {
        mmio_w(base, VMMIO_QUEUE_DESC + 0x10 * i, (uint32_t)a[i]);
        mmio_w(base, VMMIO_QUEUE_DESC + 0x10 * i + 4, (uint32_t)(a[i] >> 32));
    }
    mmio_w(base, VMMIO_QUEUE_READY, 1);
}

/* Offers one buffer (descriptor `flags`) on queue `index` and kicks. */
static void vq_offer_flags(const struct env *e, struct vq *q, uint32_t index, uint64_t buf, uint32_t len,
                           uint16_t flags) {
    uint16_t head = q->idx % VQ_SIZE;
    volatile uint8_t *d = (volatile uint8_t *)(q->desc + 16 * head);
    *(volatile uint64_t *)d = buf;
    *(volatile uint32_t *)(d + 8) = len;
    *(volatile uint16_t *)(d + 12) = flags;
    *(volatile uint16_t *)(d + 14) = 0;
    ((volatile uint16_t *)q->avail)[2 + head] = head;
    __asm__ volatile("" ::: "memory"); /* x86 keeps stores in order */
    q->idx++;
    ((volatile uint16_t *)q->avail)[1] = q->idx;
    mmio_w(e->c.balloon_gpa, VMMIO_QUEUE_NOTIFY, index);
}

/* Offers one device-readable buffer on queue `index` and kicks. */
static void vq_offer(const struct env *e, struct vq *q, uint32_t index, uint64_t buf, uint32_t len) {
    vq_offer_flags(e, q, index, buf, len, 0);
}

/* True when the device used every buffer offered on `q`. */
static int vq_done(const struct vq *q) { return ((volatile uint16_t *)q->used)[1] == q->idx; }

/* Offers a buffer, kicks, and polls until the device used it (at most 10 s);
 * returns 0 on success. */
static int vq_send_flags(const struct env *e, struct vq *q, uint32_t index, uint64_t buf, uint32_t len,
                         uint16_t flags) {
    vq_offer_flags(e, q, index, buf, len, flags);
    uint64_t deadline = rdtsc() + 10 * e->c.tsc_khz * 1000;
    while (!vq_done(q)) {
        if (rdtsc() > deadline) return -1;
        doorbell(e, DB_SLEEP_US, 100);
    }
    return 0;
}

static int vq_send(const struct env *e, struct vq *q, uint32_t index, uint64_t buf, uint32_t len) {
    return vq_send_flags(e, q, index, buf, len, 0);
}

/* Sends the PFNs of this vCPU's pages [first, end) on queue `index`, 256 per buffer. */
static int send_pfns(const struct env *e, struct vq *q, uint32_t index, uint64_t first, uint64_t end) {
    volatile uint32_t *pfns = (volatile uint32_t *)(e->c.balloon_scratch_gpa + 0x6000);
    for (uint64_t i = first; i < end; i += PFNS_PER_BUF) {
        uint64_t k = end - i < PFNS_PER_BUF ? end - i : PFNS_PER_BUF;
        for (uint64_t j = 0; j < k; j++) pfns[j] = (uint32_t)((e->c.data_gpa >> 12) + i + j);
        if (vq_send(e, q, index, (uint64_t)pfns, (uint32_t)(4 * k))) return -1;
    }
    return 0;
}

/* Writes the statistics buffer (total and available memory of this vCPU's
 * slice, wake-ups as minor faults) and offers it on the stats queue. */
static void send_stats(const struct env *e, struct vq *q, uint64_t inflated) {
    volatile uint8_t *buf = (volatile uint8_t *)(e->c.balloon_scratch_gpa + 0xa000);
    uint64_t v[3][2] = {{5, e->c.npages << 12}, {6, (e->c.npages - inflated) << 12}, {3, e->rep->wakeups}};
    for (int i = 0; i < 3; i++) {
        *(volatile uint16_t *)(buf + 10 * i) = (uint16_t)v[i][0];
        for (int b = 0; b < 8; b++) buf[10 * i + 2 + b] = (uint8_t)(v[i][1] >> (8 * b));
    }
    vq_offer(e, q, 2, (uint64_t)buf, 30);
}

static void balloon_fail(const struct env *e, struct line *l, const char *what) {
    e->rep->mismatches = e->rep->mismatches + 1;
    line_str(l, "balloon: ");
    line_str(l, what);
    line_str(l, "\n");
    line_send(e, l);
}

/* True when page i of this vCPU's slice holds only zeros. */
static int page_is_zero(const struct env *e, uint64_t i) {
    const uint64_t *p = page_ptr(e, i);
    for (int j = 0; j < PAGE_WORDS; j++)
        if (p[j]) return 0;
    return 1;
}

/* The balloon as the driver holds it: pages [0, size) of this vCPU's slice. */
struct balloon {
    struct vq *inflate, *deflate;
    uint64_t size;
};

/* Inflates or deflates the balloon to `target` pages (at most this vCPU's pages)
 * and writes `actual`. Deflated pages must read zero (each one that does not is a
 * mismatch) and are refilled. Returns -1 when the device did not serve a queue. */
static int balloon_resize(const struct env *e, struct balloon *bl, uint64_t target) {
    struct line out = {.len = 0};
    uint64_t n = target < e->c.npages ? target : e->c.npages, cur = bl->size;
    if (n >= cur) {
        if (send_pfns(e, bl->inflate, 0, cur, n)) {
            balloon_fail(e, &out, "inflate queue not serviced");
            return -1;
        }
        bl->size = n;
        mmio_w(e->c.balloon_gpa, VMMIO_CONFIG + 4, (uint32_t)n); /* actual */
        line_str(&out, "balloon: inflated ");
        line_u64(&out, n - cur);
        line_str(&out, " pages\n");
        line_send(e, &out);
        return 0;
    }
    if (send_pfns(e, bl->deflate, 1, n, cur)) {
        balloon_fail(e, &out, "deflate queue not serviced");
        return -1;
    }
    bl->size = n;
    mmio_w(e->c.balloon_gpa, VMMIO_CONFIG + 4, (uint32_t)n);
    uint64_t not_zero = 0;
    for (uint64_t i = n; i < cur; i++) {
        not_zero += (uint64_t)!page_is_zero(e, i);
        fill_page(page_ptr(e, i), page_key(e, i, versions(e)[i]));
    }
    e->rep->mismatches = e->rep->mismatches + not_zero;
    line_str(&out, "balloon: deflated ");
    line_u64(&out, cur - n);
    line_str(&out, " pages, ");
    line_u64(&out, not_zero);
    line_str(&out, " not zero\n");
    line_send(e, &out);
    return 0;
}

/* Free page reporting: the scenario frees pages [n, 2n) of this vCPU's slice
 * (at most its end) and reports them as one range (a device-writable buffer, as
 * Linux does); they must read zero after, and are refilled. */
static void report_free(const struct env *e, struct vq *q, uint32_t index, uint64_t n) {
    struct line out = {.len = 0};
    uint64_t r = e->c.npages - n < n ? e->c.npages - n : n;
    if (r == 0) return;
    if (vq_send_flags(e, q, index, (uint64_t)page_ptr(e, n), (uint32_t)(r << 12), 2 /* WRITE */) != 0) {
        balloon_fail(e, &out, "reporting queue not serviced");
        return;
    }
    uint64_t not_zero = 0;
    for (uint64_t i = n; i < n + r; i++) {
        not_zero += (uint64_t)!page_is_zero(e, i);
        fill_page(page_ptr(e, i), page_key(e, i, versions(e)[i]));
    }
    e->rep->mismatches = e->rep->mismatches + not_zero;
    line_str(&out, "balloon: reported ");
    line_u64(&out, r);
    line_str(&out, " free pages, ");
    line_u64(&out, not_zero);
    line_str(&out, " not zero\n");
    line_send(e, &out);
}

/* The scenario's balloon step: inflate to the device's target (at most this
 * vCPU's pages), hold, deflate, check the pages read zero and refill them. */
static void balloon_step(const struct env *e) {
    uint64_t b = e->c.balloon_gpa;
    struct line out = {.len = 0};
    if (mmio_r(b, VMMIO_MAGIC) != 0x74726976 || mmio_r(b, VMMIO_VERSION) != 2 || mmio_r(b, VMMIO_DEVICE_ID) != 5) {
        balloon_fail(e, &out, "no virtio-mmio balloon (version 2) at its address");
        return;
    }
    mmio_w(b, VMMIO_STATUS, 0);
    mmio_w(b, VMMIO_STATUS, VSTATUS_ACK);
    mmio_w(b, VMMIO_STATUS, VSTATUS_ACK | VSTATUS_DRIVER);
    mmio_w(b, VMMIO_DEVICE_FEATURES_SEL, 1);
    if (!(mmio_r(b, VMMIO_DEVICE_FEATURES) & 1)) {
        balloon_fail(e, &out, "device does not offer VERSION_1");
        return;
    }
    mmio_w(b, VMMIO_DEVICE_FEATURES_SEL, 0);
    uint32_t offered = mmio_r(b, VMMIO_DEVICE_FEATURES);
    uint32_t stats = offered & 2;      /* VIRTIO_BALLOON_F_STATS_VQ */
    uint32_t reporting = offered & 32; /* VIRTIO_BALLOON_F_FREE_PAGE_REPORTING */
    uint32_t oom = offered & 4;        /* VIRTIO_BALLOON_F_DEFLATE_ON_OOM */
    mmio_w(b, VMMIO_DRIVER_FEATURES_SEL, 0);
    mmio_w(b, VMMIO_DRIVER_FEATURES, stats | reporting | oom);
    mmio_w(b, VMMIO_DRIVER_FEATURES_SEL, 1);
    mmio_w(b, VMMIO_DRIVER_FEATURES, 1); /* VERSION_1 (and the stats queue if offered) */
    mmio_w(b, VMMIO_STATUS, VSTATUS_ACK | VSTATUS_DRIVER | VSTATUS_FEATURES_OK);
    if (!(mmio_r(b, VMMIO_STATUS) & VSTATUS_FEATURES_OK)) {
        balloon_fail(e, &out, "FEATURES_OK refused");
        return;
    }
    struct vq inflate, deflate, statq, reportq;
    /* Queues are numbered by the features accepted: inflate, deflate, [stats], [reporting]. */
    uint32_t report_index = stats ? 3 : 2;
    uint32_t queues = report_index + (reporting ? 1 : 0);
    for (uint32_t i = 0; i < queues; i++) {
        mmio_w(b, VMMIO_QUEUE_SEL, i);
        if (mmio_r(b, VMMIO_QUEUE_NUM_MAX) < VQ_SIZE) {
            balloon_fail(e, &out, "queue too small");
            return;
        }
    }
    vq_setup(b, 0, &inflate, e->c.balloon_scratch_gpa);
    vq_setup(b, 1, &deflate, e->c.balloon_scratch_gpa + 0x3000);
    if (stats) vq_setup(b, 2, &statq, e->c.balloon_scratch_gpa + 0x7000);
    if (reporting) vq_setup(b, report_index, &reportq, e->c.balloon_scratch_gpa + 0xb000);
    mmio_w(b, VMMIO_STATUS, VSTATUS_ACK | VSTATUS_DRIVER | VSTATUS_FEATURES_OK | VSTATUS_DRIVER_OK);
    /* The device keeps the stats buffer until it wants fresh statistics. */
    if (stats) send_stats(e, &statq, 0);

    struct balloon bl = {.inflate = &inflate, .deflate = &deflate, .size = 0};
    if (balloon_resize(e, &bl, mmio_r(b, VMMIO_CONFIG) /* num_pages */)) return;
    /* Hold, following the target: a configuration-change interrupt (the device
     * changed num_pages) makes the driver inflate or deflate to the new target;
     * statistics requests (the device returned the buffer) are answered. */
    uint64_t first = bl.size;
    /* The scenario's out-of-memory: with DEFLATE_ON_OOM the driver may take pages
     * back below the target on its own, as Linux does; it inflates again only
     * when the target changes. */
    if (oom && e->c.balloon_oom_pages && bl.size) {
        uint64_t k = e->c.balloon_oom_pages < bl.size ? e->c.balloon_oom_pages : bl.size;
        line_str(&out, "balloon: out of memory, deflating ");
        line_u64(&out, k);
        line_str(&out, " pages below the target\n");
        line_send(e, &out);
        if (balloon_resize(e, &bl, bl.size - k)) return;
    }
    for (uint64_t left = e->c.balloon_hold_ms * 1000; left;) {
        uint64_t us = left < HOLD_POLL_US ? left : HOLD_POLL_US;
        doorbell(e, DB_SLEEP_US, us);
        left -= us;
        uint32_t isr = mmio_r(b, VMMIO_INTERRUPT_STATUS);
        if (isr) mmio_w(b, VMMIO_INTERRUPT_ACK, isr);
        if ((isr & 2) && balloon_resize(e, &bl, mmio_r(b, VMMIO_CONFIG))) return;
        if (stats && vq_done(&statq)) send_stats(e, &statq, bl.size);
    }
    if (bl.size && balloon_resize(e, &bl, 0)) return;
    if (reporting) report_free(e, &reportq, report_index, first);
}

void workload_main(const volatile struct workload_config *cfgp) {
    struct env env;
    struct env *e = &env;
    if (cfgp->magic != CONFIG_MAGIC) __builtin_trap();
    env.c = *(const struct workload_config *)cfgp;
    env.rep = (volatile struct workload_report *)((uint64_t)cfgp + 0x1000);
    uint64_t n = e->c.npages;
    e->rep->magic = REPORT_MAGIC;
    e->rep->npages = n;
    e->rep->start_tsc = rdtsc();
    e->rep->state = STATE_FILLING;
    struct line out = {.len = 0};
    line_str(&out, "workload: filling ");
    line_u64(&out, n);
    line_str(&out, " pages\n");
    line_send(e, &out);

    uint64_t t0 = rdtsc();
    uint64_t nwrite = 0;
    for (uint64_t i = 0; i < n; i++) {
        versions(e)[i] = 0;
        fill_page(page_ptr(e, i), page_key(e, i, 0));
        nwrite += (uint64_t)in_write_set(e, i);
        e->rep->pages_filled = i + 1;
    }
    e->rep->fill_cycles = rdtsc() - t0;
    verify_all(e);
    e->rep->now_tsc = rdtsc();
    e->rep->state = STATE_RUNNING;
    doorbell(e, DB_FILL_DONE, 0);
    line_str(&out, "workload: filled and verified\n");
    line_send(e, &out);
    if (e->c.balloon_gpa) {
        balloon_step(e);
        verify_all(e);
    }

    uint64_t hz = e->c.tsc_khz * 1000;
    uint64_t loop_start = rdtsc();
    uint64_t duration_cycles = e->c.duration_s * hz;
    uint64_t write_cursor = 0, verify_cursor = 0, written = 0;
    for (;;) {
        uint64_t now = rdtsc();
        uint64_t elapsed = now - loop_start;
        if (duration_cycles && elapsed >= duration_cycles) break;
        uint64_t due = 0;
        if (nwrite && e->c.writes_per_s) {
            uint64_t elapsed_us = elapsed * 1000 / e->c.tsc_khz;
            due = elapsed_us * e->c.writes_per_s / 1000000;
        }
        uint64_t batch = 0;
        while (written < due && batch < 4096) {
            while (!in_write_set(e, write_cursor)) write_cursor = (write_cursor + 1) % n;
            rewrite_page(e, write_cursor);
            write_cursor = (write_cursor + 1) % n;
            written++;
            batch++;
        }
        for (uint64_t c = 0; c < e->c.verify_chunk; c++) {
            verify_page(e, verify_cursor);
            if (++verify_cursor == n) {
                verify_cursor = 0;
                e->rep->full_verifies = e->rep->full_verifies + 1;
            }
        }
        e->rep->now_tsc = rdtsc();
        if (written >= due) {
            e->rep->wakeups = e->rep->wakeups + 1;
            doorbell(e, DB_SLEEP_US, e->c.quantum_us);
        }
    }
    verify_all(e);
    e->rep->now_tsc = rdtsc();
    e->rep->state = STATE_DONE;
    line_str(&out, "workload: done, mismatches ");
    line_u64(&out, e->rep->mismatches);
    line_str(&out, "\n");
    line_send(e, &out);
    for (;;) doorbell(e, DB_DONE, 0);
}
