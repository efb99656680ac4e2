// A worker thread that takes part of a lone search's work on the core the search would leave idle.
//
// A search alone in the server has its encode spread over every core (ONNX Runtime's idle threads), but what follows
// the encode ran on one: the rerank's reads of its candidates' tokens and window vectors wait on memory, and one core
// can only have so many reads in flight. Half of the candidates on a second core halves the wait. The worker spins
// while a search is under way (rouse), so handing it a job costs a store, not a wake-up; it sleeps otherwise. One
// caller at a time holds it: a second search finds it busy and does all of its work itself.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
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

    // Keeps the worker spinning, ready for a job, for the next spin_ns (starting its thread on first use).
    void rouse(std::int64_t spin_ns);
    // Runs `job` on the worker beside the caller, who must call wait() before handing it another. Returns false,
    // running nothing, when another caller holds the worker, or in a child process forked after the worker started
    // (the thread did not survive the fork): the caller then does the work itself.
    bool start(std::function<void()> job);
    // Waits for the job that start() handed over and rethrows what it threw.
    void wait();
    // Holds the worker to these CPUs from its next job on (Linux; empty: wherever the scheduler puts it). A lone
    // search runs on one CPU with its encode's workers held to the others (rag_service/api/placement.py); the
    // worker belongs with them, not with the thread that happened to start it, whose CPU it would inherit.
    void place(const std::vector<int>& cpus);

private:
    void loop();
    bool ensure_thread();

    std::mutex claim_;  // held by a caller from start() to wait()
    std::mutex lock_;   // the worker's sleep
    std::condition_variable wake_;
    std::mutex start_;  // the thread's creation
    std::function<void()> job_;
    std::exception_ptr error_;
    std::atomic<bool> posted_{false};
    std::atomic<bool> done_{false};
    std::atomic<bool> sleeping_{false};
    std::atomic<bool> stop_{false};
    std::atomic<std::int64_t> spin_until_{0};  // steady clock, ns
    std::thread thread_;
    pid_t owner_ = 0;  // the process that started the thread
    std::mutex place_;
    std::vector<int> cpus_;
    std::atomic<std::uint64_t> placed_{0};  // bumped by place(); the worker applies it when it differs from its own
    std::uint64_t applied_ = 0;             // the worker's
};

}  // namespace rag
