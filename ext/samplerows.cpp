// Row-parallel sampling of one step (see samplerows.h).

#include "samplerows.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// One step's rows, shared by the threads that sample them.
struct Job {
    runner_fast_sampler ** fasts = nullptr;  // per row: the native chain, or NULL for argmax
    const float ** logits = nullptr;         // per row: its n_vocab logits
    int32_t * toks = nullptr;                // per row: the token picked (output)
    int32_t n = 0;                           // rows
    int32_t n_vocab = 0;                     // logits per row
    runner_argmax_fn argmax = nullptr;       // greedy pick
    std::atomic<int32_t> next{0};            // next row to take

    void work() {
        for (int32_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
             i = next.fetch_add(1, std::memory_order_relaxed)) {
            toks[i] = fasts[i] ? runner_fast_sample(fasts[i], logits[i]) : argmax(logits[i], n_vocab);
        }
    }
};

// Worker threads parked on a condition variable between steps.  A step is
// published under `m` as a new generation; workers with an index below
// `wanted` join it while it is open.  The caller works too, then closes the
// step and waits until every worker that joined has left, so the job is
// never rewritten while a worker still reads it.
class Pool {
public:
    explicit Pool(int n_workers) {
        for (int i = 0; i < n_workers; i++) {
            std::thread(&Pool::worker, this, i).detach();  // lives as long as the process
        }
        size_ = n_workers;
    }

    int size() const { return size_; }

    // Run `job` on the caller and up to `extra` workers; false when another
    // caller holds the pool (the caller then runs the rows alone).
    bool run(Job & job, int extra) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock()) {
            return false;
        }
        {
            std::lock_guard<std::mutex> lk(m_);
            job_ = &job;
            wanted_ = extra;
            joined_ = left_ = 0;
            open_ = true;
            gen_++;
        }
        wake_.notify_all();
        job.work();
        std::unique_lock<std::mutex> lk(m_);
        open_ = false;
        done_.wait(lk, [this] { return left_ == joined_; });
        job_ = nullptr;
        return true;
    }

private:
    void worker(int index) {
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            wake_.wait(lk, [&] { return gen_ != seen; });
            seen = gen_;
            if (!open_ || index >= wanted_) {
                continue;
            }
            joined_++;
            Job * job = job_;
            lk.unlock();
            job->work();
            lk.lock();
            if (++left_ == joined_) {
                done_.notify_one();  // the caller waits for the last one out
            }
        }
    }

    std::mutex busy_;                 // held by the one caller using the pool
    std::mutex m_;                    // guards everything below
    std::condition_variable wake_;    // a new generation was published
    std::condition_variable done_;    // a worker left the current step
    Job * job_ = nullptr;             // the current step's rows
    uint64_t gen_ = 0;                // step counter
    int wanted_ = 0;                  // workers with a smaller index may join
    int joined_ = 0;                  // workers that joined the current step
    int left_ = 0;                    // of those, how many finished
    bool open_ = false;               // workers may still join
    int size_ = 0;                    // workers
};

Pool * shared_pool() {
    // Made by the first call that wants helpers, one worker per core but
    // the caller's, and never freed (its threads are detached).
    static Pool * pool = [] {
        unsigned hw = std::thread::hardware_concurrency();
        int n = hw > 1 ? static_cast<int>(hw) - 1 : 0;
        return new Pool(n < 63 ? n : 63);
    }();
    return pool;
}

}  // namespace

extern "C" void runner_sample_rows(runner_fast_sampler ** fasts, const float ** logits, int32_t * toks,
                                   int32_t n, int32_t n_vocab, runner_argmax_fn argmax, int32_t n_threads) {
    Job job;
    job.fasts = fasts;
    job.logits = logits;
    job.toks = toks;
    job.n = n;
    job.n_vocab = n_vocab;
    job.argmax = argmax;
    // A helper is worth its wake-up only with at least two rows to take.
    int extra = (n_threads < n / 2 ? n_threads : n / 2) - 1;
    if (extra > 0) {
        Pool * pool = shared_pool();
        if (extra > pool->size()) {
            extra = pool->size();
        }
        if (extra > 0 && pool->run(job, extra)) {
            return;
        }
    }
    job.work();
}
