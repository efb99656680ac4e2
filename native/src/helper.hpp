// A worker thread that takes part of a lone search's work on the core the search would leave idle.
//
// A search alone in the server has its encode spread over every core (ONNX Runtime's idle threads), but what follows
// the encode ran on one: the dense scan's and the rerank's reads of scattered rows wait on memory, and one core can
// only have so many reads in flight. Work shared with a second core halves the wait. The worker spins while a search
// is under way (rouse), so handing it work costs a store, not a wake-up; it sleeps otherwise. Work is shared in chunks
// that the caller and the worker claim in turn (share), so a worker that wakes late takes fewer chunks, or none, and
// the caller never waits for one that has not started. One caller at a time holds it: a second search finds it busy
// and does all of its work itself.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace rag {

class Helper {
public:
    Helper() = default;
    ~Helper();
    Helper(const Helper&) = delete;
    Helper& operator=(const Helper&) = delete;

    // Keeps the worker spinning, ready for work, for the next spin_ns (starting its thread on first use).
    void rouse(std::int64_t spin_ns);
    // Ends the spin (the search is done): the worker sleeps once its job, if any, ends. Spinning on, it would take a
    // core from the next search's encode.
    void rest() { spin_until_.store(0); }
    // Offers `job` to the worker; the caller must call finish() before offering another. Returns false, offering
    // nothing, when another caller holds the worker, or in a child process forked after the worker started (the
    // thread did not survive the fork).
    bool start(std::function<void()> job);
    // Withdraws the job if the worker has not begun it, else waits for it to end; rethrows what it threw.
    void finish();
    // finish(), dropping what the job threw (the caller is unwinding with an error of its own).
    void finish_quietly() noexcept;
    // Holds the worker to these CPUs from its next job on (Linux; empty: wherever the scheduler puts it). A lone
    // search runs on one CPU with its encode's workers held to the others (rag_service/api/placement.py); the
    // worker belongs with them, not with the thread that happened to start it, whose CPU it would inherit.
    void place(const std::vector<int>& cpus);
    // Jobs the worker has run (not withdrawn before it began them): how often a search's work was shared.
    std::uint64_t jobs() const { return jobs_.load(); }

private:
    enum State : int { kIdle = 0, kPosted = 1, kRunning = 2, kDone = 3 };
    void loop();
    bool ensure_thread();
    void apply_placement();

    std::mutex claim_;  // held by a caller from start() to finish()
    std::mutex lock_;   // the worker's sleep
    std::condition_variable wake_;
    std::mutex start_;  // the thread's creation
    std::function<void()> job_;
    std::exception_ptr error_;
    std::atomic<int> state_{kIdle};
    std::atomic<bool> sleeping_{false};
    std::atomic<bool> stop_{false};
    std::atomic<std::int64_t> spin_until_{0};  // steady clock, ns
    std::atomic<std::uint64_t> jobs_{0};
    std::thread thread_;
    pid_t owner_ = 0;  // the process that started the thread
    std::mutex place_;
    std::vector<int> cpus_;
    std::atomic<std::uint64_t> placed_{0};  // bumped by place(); the worker applies it when it differs from its own
    std::uint64_t applied_ = 0;             // the worker's own: read and written by it alone
};

// How long at most the worker spins once a search (or a rerank) starts, unless the search ends first (rest): the
// work after the encode takes ~0.2-1 ms on SciFact, and a worker that slept costs a wake-up of ~0.1 ms on the VMs of
// bench/README.md.
inline constexpr std::int64_t kSearchSpinNs = 2'000'000;

// Rouses `helper` (if any) for the scope's work and lets it rest when the scope ends, however it ends.
class Roused {
public:
    explicit Roused(Helper* helper) : helper_(helper) {
        if (helper_ != nullptr) helper_->rouse(kSearchSpinNs);
    }
    ~Roused() {
        if (helper_ != nullptr) helper_->rest();
    }
    Roused(const Roused&) = delete;
    Roused& operator=(const Roused&) = delete;

private:
    Helper* helper_;
};

// body(begin, end) over [0, n) in chunks of `chunk`, claimed in turn by the caller and (when `helper` is given and
// free) its worker; returns once every chunk has run. Each chunk writes only its own part of the output, so the
// result is the same whoever ran it. An exception ends the sharing: it reaches the caller once no chunk runs any more.
template <class Body>
void share(Helper* helper, std::size_t n, std::size_t chunk, Body&& body) {
    chunk = std::max<std::size_t>(chunk, 1);
    if (helper == nullptr || n <= chunk) {
        if (n > 0) body(std::size_t{0}, n);
        return;
    }
    std::atomic<std::size_t> next{0};
    auto work = [&]() {
        for (;;) {
            const std::size_t begin = next.fetch_add(chunk);
            if (begin >= n) return;
            body(begin, std::min(n, begin + chunk));
        }
    };
    const bool shared = helper->start([&work] { work(); });
    try {
        work();
    } catch (...) {
        next.store(n);  // no new chunks for the worker
        if (shared) helper->finish_quietly();  // its chunk writes into the caller's arrays: it must end first
        throw;
    }
    if (shared) helper->finish();
}

}  // namespace rag
