#include "helper.hpp"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <utility>

namespace rag {
namespace {

std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

}  // namespace

Helper::~Helper() {
    stop_.store(true);
    {
        const std::lock_guard<std::mutex> hold(lock_);
    }
    wake_.notify_one();
    if (thread_.joinable()) {
        if (owner_ == getpid()) {
            thread_.join();
        } else {
            thread_.detach();  // a forked child's copy names a thread that only ran in the parent
        }
    }
}

bool Helper::ensure_thread() {
    const std::lock_guard<std::mutex> hold(start_);
    if (thread_.joinable()) return owner_ == getpid();
    owner_ = getpid();
    thread_ = std::thread([this] { loop(); });
    return true;
}

void Helper::rouse(std::int64_t spin_ns) {
    if (!ensure_thread()) return;
    spin_until_.store(now_ns() + spin_ns);
    if (sleeping_.load()) {
        // Taken and released so that a worker between its check and its sleep cannot miss the notification.
        { const std::lock_guard<std::mutex> hold(lock_); }
        wake_.notify_one();
    }
}

bool Helper::start(std::function<void()> job) {
    if (!claim_.try_lock()) return false;
    if (!ensure_thread()) {
        claim_.unlock();
        return false;
    }
    job_ = std::move(job);
    error_ = nullptr;
    state_.store(kPosted, std::memory_order_release);
    if (sleeping_.load()) {
        { const std::lock_guard<std::mutex> hold(lock_); }
        wake_.notify_one();
    }
    return true;
}

void Helper::finish() {
    int posted = kPosted;
    // Not begun: withdrawn, and the worker will never read it.
    if (!state_.compare_exchange_strong(posted, kIdle)) {
        while (state_.load(std::memory_order_acquire) != kDone) relax();
        state_.store(kIdle);
    }
    job_ = nullptr;
    const std::exception_ptr error = std::exchange(error_, nullptr);
    claim_.unlock();
    if (error) std::rethrow_exception(error);
}

void Helper::finish_quietly() noexcept {
    try {
        finish();
    } catch (...) {
    }
}

void Helper::place(const std::vector<int>& cpus) {
    {
        const std::lock_guard<std::mutex> hold(place_);
        cpus_ = cpus;
        placed_.fetch_add(1);
    }
    if (sleeping_.load()) {
        { const std::lock_guard<std::mutex> hold(lock_); }
        wake_.notify_one();
    }
}

void Helper::apply_placement() {
    const std::lock_guard<std::mutex> hold(place_);
    applied_ = placed_.load();
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    for (const int cpu : cpus_) {
        if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &set);
    }
    // A CPU set the process may not use leaves the worker where it is: it still computes the same.
    if (CPU_COUNT(&set) > 0) sched_setaffinity(0, sizeof set, &set);
#endif
}

void Helper::loop() {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "rag-helper");  // as py-spy, top -H and /proc name it
#endif
    for (;;) {
        for (;;) {
            // Placed anew as soon as it is told, asleep or not: left on the caller's CPU it might never get a turn
            // during a call, and so never take the job after which it would look.
            if (placed_.load(std::memory_order_relaxed) != applied_) apply_placement();
            // Read before the exchange is tried: a spinning worker must not write the line the caller posts to.
            if (state_.load(std::memory_order_relaxed) == kPosted) {
                int posted = kPosted;
                if (state_.compare_exchange_strong(posted, kRunning, std::memory_order_acquire)) break;
                continue;  // withdrawn meanwhile
            }
            if (stop_.load()) return;
            if (now_ns() < spin_until_.load(std::memory_order_relaxed)) {
                relax();
                continue;
            }
            std::unique_lock<std::mutex> hold(lock_);
            sleeping_.store(true);
            wake_.wait(hold, [this] {
                return stop_.load() || state_.load() == kPosted || now_ns() < spin_until_.load() ||
                       placed_.load() != applied_;
            });
            sleeping_.store(false);
        }
        jobs_.fetch_add(1, std::memory_order_relaxed);
        try {
            job_();
        } catch (...) {
            error_ = std::current_exception();
        }
        state_.store(kDone, std::memory_order_release);
    }
}

}  // namespace rag
