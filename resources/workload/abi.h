/* densevm workload guest ABI: the config page densevm writes and the report page the
 * guest writes. Mirrored by vmm/src/workload/abi.rs; keep both in sync. */
#ifndef DENSEVM_WORKLOAD_ABI_H
#define DENSEVM_WORKLOAD_ABI_H
#include <stdint.h>

/* densevm starts every vCPU with RDI = its config page; its report page follows. */
#define CONFIG_MAGIC 0x44564d43464730ULL /* "DVMCFG0" */
#define REPORT_MAGIC 0x44564d52505430ULL /* "DVMRPT0" */

/* Doorbell commands: the low 8 bits of a 64-bit MMIO write to cfg.doorbell_gpa;
 * the upper 56 bits are the argument. */
#define DB_SLEEP_US 1   /* arg: microseconds to sleep (an idle wait) */
#define DB_FILL_DONE 2  /* fill and first verify finished */
#define DB_DONE 3       /* write loop over, final verify done; the guest stops */
#define DB_MISMATCH 4   /* arg: page index whose content did not verify */
#define DB_PROGRESS 5   /* report page updated */
#define DB_PUTS 6       /* arg: guest address of a NUL-terminated line for the console */

#define STATE_BOOT 0
#define STATE_FILLING 1
#define STATE_RUNNING 2
#define STATE_DONE 3

struct workload_config {
    uint64_t magic;
    uint64_t doorbell_gpa;
    uint64_t data_gpa;       /* first data page */
    uint64_t npages;         /* data pages this vCPU fills */
    uint64_t page_base;      /* global index of this vCPU's first data page */
    uint64_t versions_gpa;   /* u32 per data page: last version written */
    uint64_t tsc_khz;
    uint64_t zero_thr;       /* fractions as thresholds over 2^32 */
    uint64_t shared_thr;
    uint64_t write_thr;
    uint64_t shared_seed;
    uint64_t seed;
    uint64_t writes_per_s;
    uint64_t duration_s;
    uint64_t quantum_us;     /* idle sleep granularity */
    uint64_t verify_chunk;   /* pages verified per wake-up in the loop */
    uint64_t serial;         /* 1: print progress lines on the console (DB_PUTS) */
    uint64_t balloon_gpa;    /* virtio-mmio balloon registers, or 0: no balloon step */
    uint64_t balloon_scratch_gpa; /* 16 pages of RAM for the balloon driver's rings */
    uint64_t balloon_hold_ms;/* how long the balloon stays inflated */
    uint64_t balloon_oom_pages; /* deflated below the target on its own (deflate on OOM), or 0 */
};

struct workload_report {
    uint64_t magic;
    uint64_t state;
    uint64_t npages;
    uint64_t pages_filled;
    uint64_t pages_written;   /* rewrites in the write loop */
    uint64_t pages_verified;  /* page verifications done */
    uint64_t mismatches;
    uint64_t first_mismatch;  /* page index + 1, or 0 */
    uint64_t full_verifies;   /* complete verify passes */
    uint64_t fill_cycles;     /* TSC cycles for the fill */
    uint64_t start_tsc;       /* TSC when the guest started */
    uint64_t now_tsc;         /* TSC at the last report update */
    uint64_t write_cycles_sum;/* TSC cycles spent in rewrites */
    uint64_t write_cycles_max;
    uint64_t write_first_cycles_max; /* slowest first store into a page */
    uint64_t write_first_cycles_sum;
    uint64_t wakeups;
};
#endif
