// OpenMP team sizes for the CPU kernels.
//
// Forked children: libgomp's thread pool does not survive fork(); a forked child
// (DataLoader workers, multiprocessing's "fork") that opens a parallel region of more than
// one thread after its parent used OpenMP waits forever for pool threads it does not have,
// so a forked child runs every kernel on one thread, as PyTorch's DataLoader workers do.
//
// Busy cores: a parallel region ends at a barrier, and a team thread that shares its core
// with another busy process arrives there a scheduler time slice late (measured: the worst
// of 21 condensations at N = 1.28 M took 85 ms with one core busy against a 2.4 ms idle
// median). Each op therefore sizes its team once, when its work is large enough for a team
// at all, by the cores free at that moment: /proc/loadavg's count of runnable threads
// (this one included), less our own pool threads that may still be spinning after a
// region that ended within the last few milliseconds. Only where the process may use every
// online CPU (a cpuset-limited container sees the host's count) and unless
// KCD_FAST_LOAD_AWARE=0.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __unix__
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#endif

#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

std::atomic<bool> g_forked{false};
std::atomic<int64_t> g_last_team_end_ns{0};  // when the last op that used a team of > 1 ended
std::atomic<int> g_last_team{1};
thread_local int t_cap = 0;  // the current op's team cap (0: none)

#ifdef __unix__
void mark_forked_child() { g_forked.store(true, std::memory_order_relaxed); }
// Registered when the module loads, before any kernel runs.
const int g_registered = pthread_atfork(nullptr, nullptr, mark_forked_child);
#endif

constexpr int64_t kSpinWindowNs = 10'000'000;  // libgomp pool threads spin this long at most

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPUs this process may run on, when that is every online CPU; else 0 (load unknown).
int all_cpus_allowed() {
#ifdef __linux__
  const char* env = std::getenv("KCD_FAST_LOAD_AWARE");
  if (env != nullptr && std::strcmp(env, "0") == 0) return 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
  const int allowed = CPU_COUNT(&set);
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  return allowed == online ? allowed : 0;
#else
  return 0;
#endif
}

// Runnable threads in the system now (/proc/loadavg's fourth field "R/T"), or -1.
int runnable_now() {
#ifdef __linux__
  const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char buf[128];
  const ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return -1;
  buf[n] = '\0';
  int running = -1, total = 0;
  float a, b, c;
  if (std::sscanf(buf, "%f %f %f %d/%d", &a, &b, &c, &running, &total) != 5) return -1;
  return running;
#else
  return -1;
#endif
}

int max_team() {
#ifdef _OPENMP
  return g_forked.load(std::memory_order_relaxed) ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_threads() {
  const int t = max_team();
  return t_cap > 0 && t_cap < t ? t_cap : t;
}

int free_cores_team(int want) {
  static const int allowed = all_cpus_allowed();
  if (want <= 1 || allowed == 0) return want;
  const int running = runnable_now();
  if (running < 0) return want;
  int ours = 0;  // pool threads of an op that ended moments ago may still spin (runnable)
  if (now_ns() - g_last_team_end_ns.load(std::memory_order_relaxed) < kSpinWindowNs) {
    ours = g_last_team.load(std::memory_order_relaxed) - 1;
  }
  int others = running - 1 - ours;
  others = others < 0 ? 0 : others;
  const int free = allowed - others;
  return free < 1 ? 1 : (free < want ? free : want);
}

TeamScope::TeamScope(int64_t work, int64_t threshold) : previous_(t_cap) {
  team_ = work >= threshold ? free_cores_team(max_team()) : 1;
  t_cap = team_;
}

TeamScope::~TeamScope() {
  if (team_ > 1) {
    g_last_team.store(team_, std::memory_order_relaxed);
    g_last_team_end_ns.store(now_ns(), std::memory_order_relaxed);
  }
  t_cap = previous_;
}

}  // namespace cpu
}  // namespace kcd
