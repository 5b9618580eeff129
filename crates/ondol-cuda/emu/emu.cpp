// The SIMT emulator: runs ondol's CUDA kernels, compiled as C++ (emu.h), on the CPU, so that
// every kernel and the backend code that launches it are checked against the CPU reference
// on machines without a GPU (src/emu.rs).
//
// A launch runs its blocks one after another on the calling thread. A block's threads are
// fibers that a scheduler switches cooperatively: each runs until it waits at a barrier or
// ends, in thread order, or in reverse thread order when the launch asks for it
// (a kernel that reads shared memory another thread writes without a barrier in between then
// reads stale data in one of the two orders, so running both catches the missing barrier);
// the reverse launch also runs its blocks from the last one.
// A block barrier opens when every thread that has not ended waits at it, a warp barrier when
// every such thread of the warp does; threads of a warp waiting at different barriers are a
// deadlock (a barrier in divergent code), and the launch fails with a message instead of
// hanging. So does a
// full-warp operation (shuffle, mma) reached after some lane of the warp has returned.
// Shared memory starts every block as 0xff bytes (NaN as floats), so reading it before
// writing shows: dynamic shared memory, and each static `__shared__` array when the block's
// first thread reaches its declaration (build.rs adds the call; these arrays are thread_local,
// so without it a block would read what the block before it left).
//
// Memory the kernels address (the backend's buffers, from ondol_emu_alloc, and each launch's
// dynamic shared memory) ends at a page with no access: a kernel that reads or writes past
// the end of a buffer (by more than its rounding to 16 bytes) faults there, and the fault
// fails the launch with the thread's coordinates and the address, as compute-sanitizer's
// memcheck would report it on the GPU.
//
// A fiber is made once (ucontext: its own stack) and then loops, running the kernel for one
// block after another and across launches. Switches are _setjmp/_longjmp, which, unlike
// swapcontext, make no system call (swapcontext saves the signal mask every time, and made
// the emulator spend most of its time in the kernel).

// _longjmp between fiber stacks is what the fibers are for; fortified longjmp would refuse it.
#undef _FORTIFY_SOURCE
#include "emu.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace {

// ---- Memory that ends at an inaccessible page ------------------------------------------------

size_t page_bytes() {
    static const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

size_t rounded16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The bytes a guarded block of `bytes` spans: its whole pages, then the guard page.
size_t guarded_span(size_t bytes) {
    const size_t page = page_bytes();
    return (rounded16(bytes) + page - 1) / page * page + page;
}

// `bytes` zeroed bytes, 16-byte aligned, whose end (rounded to 16 bytes) is the start of a
// page with no access; null when the system has no memory for them.
unsigned char* guarded_alloc(size_t bytes) {
    const size_t span = guarded_span(bytes), data = span - page_bytes();
    void* base = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    if (data > 0 && mprotect(base, data, PROT_READ | PROT_WRITE) != 0) {
        munmap(base, span);
        return nullptr;
    }
    return (unsigned char*)base + data - rounded16(bytes);
}

void guarded_free(unsigned char* p, size_t bytes) {
    const size_t span = guarded_span(bytes);
    munmap(p + rounded16(bytes) - (span - page_bytes()), span);
}

enum class State { Run, BlockBarrier, WarpBarrier, Done };

// A cp.async copy in flight: its bytes (read when issued) and the group it belongs to.
struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
    int group;
};

struct Lane {
    ucontext_t ctx;
    jmp_buf env;
    // Whether the fiber exists (has been entered once); a failed launch abandons them all.
    bool started = false;
    std::vector<char> stack;
    ondol_dim3 tid;
    int linear;
    State state;
    // The thread's cp.async copies that have not landed, and the groups it has committed
    // (a copy issued now joins group `committed`, closed by the next commit).
    std::vector<AsyncCopy> copies;
    int committed;
};

// Per lane, the words one warp-wide mma exchanges: 4 of A, 2 of B.
struct MmaSlot {
    unsigned a[4];
    unsigned b[2];
};

constexpr size_t STACK_BYTES = 256 << 10;
constexpr size_t MAX_THREADS = 1024;

struct Block {
    jmp_buf sched;
    // The fibers, MAX_THREADS of them reserved so that none ever moves; the first `n` run.
    std::vector<Lane> lanes;
    size_t n = 0;
    Lane* current = nullptr;
    ondol_dim3 block_idx{}, block_dim{}, grid_dim{};
    // This launch's dynamic shared memory (guarded_alloc'ed) and its size.
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::vector<uint64_t> warp_slots;
    // Threads of each warp that have ended in the current block.
    std::vector<int> warp_done;
    std::vector<MmaSlot> mma;
    // The static __shared__ arrays poisoned in the current block.
    std::vector<void*> poisoned;
    void (*thunk)(void**) = nullptr;
    void** params = nullptr;
    std::string error;
};

thread_local Block* running = nullptr;

void park(State s);
[[noreturn]] void fail(const std::string& message);
std::string where(const Block& b);

// Every fiber's body: the kernel for the current block, then wait to be run again. A thread
// that ends with cp.async copies it never waited for copied for nothing, or for a reader
// that never looked: a bug either way, so the launch fails.
void lane_main() {
    for (;;) {
        Block* b = running;
        b->thunk(b->params);
        if (!b->current->copies.empty())
            fail("a thread at " + where(*b) + " ended with " + std::to_string(b->current->copies.size()) +
                 " cp.async copies it never waited for");
        park(State::Done);
    }
}

// Parks the current thread in `s` and returns to the scheduler until it runs again.
void park(State s) {
    Block* b = running;
    Lane* l = b->current;
    l->state = s;
    if (s == State::Done) b->warp_done[l->linear / 32]++;
    if (!_setjmp(l->env)) _longjmp(b->sched, 1);
}

// Runs `l` until it parks.
void resume(Block& b, Lane& l) {
    b.current = &l;
    if (_setjmp(b.sched)) {
        b.current = nullptr;  // back in the scheduler: no kernel code runs
        return;
    }
    if (l.started) _longjmp(l.env, 1);
    l.started = true;
    if (l.stack.empty()) l.stack.resize(STACK_BYTES);
    getcontext(&l.ctx);
    l.ctx.uc_stack.ss_sp = l.stack.data();
    l.ctx.uc_stack.ss_size = l.stack.size();
    l.ctx.uc_link = nullptr;
    makecontext(&l.ctx, lane_main, 0);
    setcontext(&l.ctx);
}

// Ends the launch with `message`: the thread never resumes.
[[noreturn]] void fail(const std::string& message) {
    Block* b = running;
    if (b->error.empty()) b->error = message;
    park(State::Done);
    std::abort();
}

std::string where(const Block& b) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "block (%u, %u, %u), thread (%u, %u, %u)", b.block_idx.x, b.block_idx.y,
                  b.block_idx.z, b.current->tid.x, b.current->tid.y, b.current->tid.z);
    return buf;
}

// A fault while a kernel runs (a thread addressing past the end of a buffer or of shared
// memory, or memory it has no business with) fails the launch. A fault anywhere else goes
// to the handler that was there before (Rust's, which reports stack overflows).
struct sigaction previous_fault_action;

void on_fault(int sig, siginfo_t* info, void*) {
    Block* b = running;
    if (b == nullptr || b->current == nullptr) {
        sigaction(sig, &previous_fault_action, nullptr);
        return;  // the access faults again, under the previous handler
    }
    char buf[96];
    std::snprintf(buf, sizeof buf, "an access to %p, which is past a buffer's end or no buffer at all",
                  info->si_addr);
    fail("memory fault at " + where(*b) + ": " + buf);
}

// Makes on_fault the SIGSEGV handler, unless it is (one thread at a time, so that the
// previous handler kept is never on_fault itself). SA_NODEFER: the handler leaves by jumping
// back to the scheduler, so the signal must not stay blocked.
void catch_faults() {
    static std::mutex installing;
    std::lock_guard<std::mutex> lock(installing);
    struct sigaction now;
    sigaction(SIGSEGV, nullptr, &now);
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_fault) return;
    previous_fault_action = now;
    struct sigaction mine{};
    mine.sa_sigaction = on_fault;
    mine.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&mine.sa_mask);
    sigaction(SIGSEGV, &mine, nullptr);
}

// The range of linear thread indices in the warp of `linear`.
void warp_range(const Block& b, int linear, int* first, int* end) {
    *first = linear / 32 * 32;
    *end = std::min<int>(*first + 32, (int)b.n);
}

std::string deadlock(const Block& b) {
    int at_block = 0, at_warp = 0, done = 0;
    for (size_t i = 0; i < b.n; i++) {
        at_block += b.lanes[i].state == State::BlockBarrier;
        at_warp += b.lanes[i].state == State::WarpBarrier;
        done += b.lanes[i].state == State::Done;
    }
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "block (%u, %u, %u) deadlocked: %d threads wait at __syncthreads, %d at a warp barrier, %d ended "
                  "(a barrier in divergent code?)",
                  b.block_idx.x, b.block_idx.y, b.block_idx.z, at_block, at_warp, done);
    return buf;
}

// Runs the threads `first..end` (one warp) until each has ended or waits at __syncthreads,
// opening the warp's barriers as they fill. False on a failure or a deadlock.
bool run_warp(Block& b, int first, int end, bool reverse) {
    for (;;) {
        for (int k = first; k < end; k++) {
            Lane& l = b.lanes[reverse ? end - 1 - (k - first) : k];
            if (l.state != State::Run) continue;
            resume(b, l);
            if (!b.error.empty()) return false;
        }
        int at_warp = 0, done = 0;
        for (int i = first; i < end; i++) {
            at_warp += b.lanes[i].state == State::WarpBarrier;
            done += b.lanes[i].state == State::Done;
        }
        if (at_warp == 0) return true;
        if (at_warp + done != end - first) {
            b.error = deadlock(b);
            return false;
        }
        for (int i = first; i < end; i++)
            if (b.lanes[i].state == State::WarpBarrier) b.lanes[i].state = State::Run;
    }
}

// Runs one block: warp by warp up to each __syncthreads, which opens once every thread that
// has not ended waits at it.
bool run_block(Block& b, bool reverse) {
    const int n = (int)b.n, warps = (n + 31) / 32;
    for (int i = 0; i < n; i++) {
        b.lanes[i].state = State::Run;
        b.lanes[i].copies.clear();
        b.lanes[i].committed = 0;
    }
    std::fill(b.warp_done.begin(), b.warp_done.end(), 0);
    std::fill(b.smem, b.smem + b.smem_bytes, 0xff);
    b.poisoned.clear();
    for (;;) {
        for (int k = 0; k < warps; k++) {
            const int w = reverse ? warps - 1 - k : k;
            if (!run_warp(b, 32 * w, std::min(32 * w + 32, n), reverse)) return false;
        }
        bool waiting = false;
        for (int i = 0; i < n; i++)
            if (b.lanes[i].state == State::BlockBarrier) {
                b.lanes[i].state = State::Run;
                waiting = true;
            }
        if (!waiting) return true;
    }
}

}  // namespace

extern "C" const ondol_dim3* ondol_emu_thread_idx() { return &running->current->tid; }
extern "C" const ondol_dim3* ondol_emu_block_idx() { return &running->block_idx; }
extern "C" const ondol_dim3* ondol_emu_block_dim() { return &running->block_dim; }
extern "C" const ondol_dim3* ondol_emu_grid_dim() { return &running->grid_dim; }
extern "C" void ondol_emu_syncthreads() { park(State::BlockBarrier); }
extern "C" void ondol_emu_syncwarp() { park(State::WarpBarrier); }
extern "C" int ondol_emu_lane() { return running->current->linear % 32; }
extern "C" void* ondol_emu_dynamic_smem() { return running->smem; }

extern "C" void ondol_emu_static_shared(void* array, size_t bytes) {
    Block& b = *running;
    if (std::find(b.poisoned.begin(), b.poisoned.end(), array) != b.poisoned.end()) return;
    std::memset(array, 0xff, bytes);
    b.poisoned.push_back(array);
}

extern "C" uint64_t* ondol_emu_warp_slot(int lane) {
    return &running->warp_slots[running->current->linear / 32 * 32 + lane];
}

extern "C" void ondol_emu_check_full_warp(const char* op) {
    Block& b = *running;
    int first, end;
    warp_range(b, b.current->linear, &first, &end);
    if (b.warp_done[first / 32] > 0) fail(std::string(op) + " at " + where(b) + " runs after a thread of its warp returned");
    if (end - first != 32) fail(std::string(op) + " at " + where(b) + " in a warp of fewer than 32 threads");
}

extern "C" void ondol_emu_check_aligned(const void* p, int bytes, const char* what) {
    if ((uintptr_t)p % bytes != 0)
        fail(std::string(what) + " at " + where(*running) + ": an address not " + std::to_string(bytes) +
             "-byte aligned (a misaligned-address fault on the GPU)");
}

namespace {
inline float bf16_at(unsigned reg, int half) { return __uint_as_float((half ? reg >> 16 : reg & 0xffffu) << 16); }
}  // namespace

// D = A B + C for a 16x16 A (row-major fragments) and a 16x8 B (column fragments), as PTX's
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 lays them out: lane = 4 g + t holds
// A rows g and g + 8, columns 2t, 2t + 1 (a[0]: row g, a[1]: row g + 8) and 2t + 8, 2t + 9
// (a[2], a[3]); B rows (k) 2t, 2t + 1 (b[0]) and 2t + 8, 2t + 9 (b[1]) of column g; C and D
// rows g (c[0], c[1]) and g + 8 (c[2], c[3]), columns 2t and 2t + 1. The low half of each
// 32-bit register is the element with the lower index.
extern "C" void ondol_emu_mma_bf16_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    ondol_emu_check_full_warp("mma.sync");
    Block& blk = *running;
    const int lane = ondol_emu_lane(), base = blk.current->linear / 32 * 32;
    MmaSlot& mine = blk.mma[blk.current->linear];
    for (int i = 0; i < 4; i++) mine.a[i] = a[i];
    for (int i = 0; i < 2; i++) mine.b[i] = b[i];
    ondol_emu_syncwarp();
    // A[row][k] and B[k][col] from the lanes that hold them.
    auto A = [&](int row, int k) {
        const int g = row % 8, t = (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
        return bf16_at(blk.mma[base + 4 * g + t].a[reg], k % 2);
    };
    auto B = [&](int k, int col) {
        const int t = (k % 8) / 2, reg = k >= 8;
        return bf16_at(blk.mma[base + 4 * col + t].b[reg], k % 2);
    };
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = c[i];
        for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
        out[i] = acc;
    }
    ondol_emu_syncwarp();
    for (int i = 0; i < 4; i++) d[i] = out[i];
}

namespace {
// Fails the launch unless [p, p + 16) lies in the block's dynamic shared memory, 16-byte aligned.
void check_shared_row(const void* p, const char* op) {
    Block& b = *running;
    const unsigned char* at = (const unsigned char*)p;
    const bool inside = at >= b.smem && at + 16 <= b.smem + b.smem_bytes;
    if (!inside || (uintptr_t)at % 16 != 0)
        fail(std::string(op) + " at " + where(b) + ": " + (inside ? "a shared address not 16-byte aligned" :
                                                                    "an address outside dynamic shared memory"));
}

// Fails the launch where matrix `matrix`'s eight 16-byte rows (one shared-memory phase of
// ldmatrix) do not fall in eight different 4-bank groups: a bank conflict, which serialises
// the load on the GPU (padded or swizzled rows avoid it).
void check_ldmatrix_banks(int matrix) {
    unsigned groups = 0;
    for (int r = 0; r < 8; r++) groups |= 1u << (*ondol_emu_warp_slot(8 * matrix + r) / 16 % 8);
    const int distinct = __builtin_popcount(groups);
    if (distinct != 8)
        fail("ldmatrix at " + where(*running) + ": the 8 rows of matrix " + std::to_string(matrix) + " fall in " +
             std::to_string(distinct) + " of the 8 groups of 4 banks (a bank conflict): pad or swizzle the rows");
}
}  // namespace

extern "C" void ondol_emu_ldmatrix(unsigned* regs, int count, int trans, const void* row) {
    ondol_emu_check_full_warp("ldmatrix");
    const int lane = ondol_emu_lane();
    if (lane < 8 * count) check_shared_row(row, "ldmatrix");
    *ondol_emu_warp_slot(lane) = (uint64_t)(uintptr_t)row;
    ondol_emu_syncwarp();
    if (lane == 0)
        for (int i = 0; i < count; i++) check_ldmatrix_banks(i);
    const int r = lane / 4, c = lane % 4;
    auto element = [&](int matrix, int mrow, int mcol) {
        uint16_t v;
        std::memcpy(&v, (const unsigned char*)(uintptr_t)*ondol_emu_warp_slot(8 * matrix + mrow) + 2 * mcol, 2);
        return (unsigned)v;
    };
    for (int i = 0; i < count; i++)
        regs[i] = trans ? element(i, 2 * c, r) | element(i, 2 * c + 1, r) << 16
                        : element(i, r, 2 * c) | element(i, r, 2 * c + 1) << 16;
    ondol_emu_syncwarp();
}

extern "C" void ondol_emu_cp_async(void* dst, const void* src, int src_bytes) {
    Block& b = *running;
    check_shared_row(dst, "cp.async");
    if ((uintptr_t)src % 16 != 0) fail("cp.async at " + where(b) + ": a global address not 16-byte aligned");
    if (src_bytes < 0 || src_bytes > 16) fail("cp.async at " + where(b) + ": a source size outside 0 to 16 bytes");
    Lane& l = *b.current;
    AsyncCopy copy{(unsigned char*)dst, {}, l.committed};
    std::memcpy(copy.bytes, src, src_bytes);
    l.copies.push_back(copy);
}

extern "C" void ondol_emu_cp_async_commit() { running->current->committed++; }

extern "C" void ondol_emu_cp_async_wait(int pending) {
    Lane& l = *running->current;
    std::vector<AsyncCopy> in_flight;
    for (const AsyncCopy& c : l.copies) {
        if (c.group < l.committed - pending)
            std::memcpy(c.dst, c.bytes, 16);
        else
            in_flight.push_back(c);
    }
    l.copies.swap(in_flight);
}

// Runs `thunk` (a kernel unpacking its arguments from `params`, as cuLaunchKernel passes
// them) over the grid. Returns 0, or 1 with a message in `err`.
extern "C" int ondol_emu_launch(void (*thunk)(void**), const unsigned grid[3], const unsigned block[3], size_t smem,
                                void** params, int reverse, char* err, size_t err_len) {
    const size_t n = (size_t)block[0] * block[1] * block[2];
    auto refuse = [&](const std::string& m) {
        std::snprintf(err, err_len, "%s", m.c_str());
        return 1;
    };
    if (n == 0 || n > MAX_THREADS) return refuse("a block of " + std::to_string(n) + " threads (1 to 1024 are allowed)");
    if (block[2] > 64) return refuse("blockDim.z above 64");
    static thread_local Block b;
    if (b.lanes.empty()) b.lanes.resize(MAX_THREADS);
    b.n = n;
    b.warp_slots.assign((n + 31) / 32 * 32, 0);
    b.warp_done.assign((n + 31) / 32, 0);
    b.mma.assign((n + 31) / 32 * 32, MmaSlot{});
    b.smem = guarded_alloc(smem);
    if (b.smem == nullptr) return refuse("no host memory for " + std::to_string(smem) + " bytes of shared memory");
    b.smem_bytes = smem;
    catch_faults();
    b.block_dim = {block[0], block[1], block[2]};
    b.grid_dim = {grid[0], grid[1], grid[2]};
    b.thunk = thunk;
    b.params = params;
    b.error.clear();
    for (size_t i = 0; i < n; i++) {
        b.lanes[i].linear = (int)i;
        b.lanes[i].tid = {(unsigned)(i % block[0]), (unsigned)(i / block[0] % block[1]),
                          (unsigned)(i / ((size_t)block[0] * block[1]))};
    }
    Block* outer = running;
    running = &b;
    // Kernels are built with --use_fast_math, so the GPU flushes f32 denormals to zero, read
    // and written: the SSE flags that do so (flush-to-zero, denormals-are-zero) hold for the
    // launch. Fibers made during it inherit them (getcontext); _longjmp never changes them.
    const unsigned host_csr = _mm_getcsr();
    _mm_setcsr(host_csr | _MM_FLUSH_ZERO_ON | 0x0040 /* denormals-are-zero */);
    int status = 0;
    // Blocks in order, or (with `reverse`) from the last: a kernel whose blocks depend on
    // each other's order within a launch gives different results in the two.
    const size_t blocks = (size_t)grid[0] * grid[1] * grid[2];
    for (size_t i = 0; i < blocks && status == 0; i++) {
        const size_t k = reverse ? blocks - 1 - i : i;
        b.block_idx = {(unsigned)(k % grid[0]), (unsigned)(k / grid[0] % grid[1]),
                       (unsigned)(k / ((size_t)grid[0] * grid[1]))};
        if (!run_block(b, reverse != 0)) status = refuse(b.error);
    }
    running = outer;
    _mm_setcsr(host_csr);
    guarded_free(b.smem, b.smem_bytes);
    b.smem = nullptr;
    // A failed block leaves fibers stopped inside the kernel: start them afresh next time.
    if (status != 0)
        for (Lane& l : b.lanes) l.started = false;
    return status;
}

extern "C" void* ondol_emu_alloc(size_t bytes) { return guarded_alloc(bytes); }
extern "C" void ondol_emu_free(void* p, size_t bytes) { guarded_free((unsigned char*)p, bytes); }
