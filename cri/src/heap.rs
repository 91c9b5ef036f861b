//! Giving freed heap back to the kernel once berthd comes to rest after a burst of
//! work (a pull, a wave of pod removals). glibc keeps freed memory in its heap and
//! arenas: without a trim, a node that ran 110 pods and removed them kept ~7 MiB more
//! than before them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How long berthd must have been asked for nothing before it trims.
const REST: Duration = Duration::from_secs(2);

/// One pending trim at most, timed from the last request; no timer while nothing asks.
#[derive(Default)]
pub struct HeapTrim {
    deadline: Mutex<Option<Instant>>,
    trims: AtomicU64,
}

impl HeapTrim {
    /// Trims the heap `REST` after the last of a burst of calls to this.
    pub fn after_burst(self: &Arc<Self>) {
        let pending = self.lock().replace(Instant::now() + REST).is_some();
        if pending {
            return; // the pending task sees the new deadline
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Some(at) = *me.lock() else { return };
                tokio::time::sleep_until(at).await;
                let due = {
                    let mut deadline = me.lock();
                    let due = deadline.is_some_and(|at| at <= Instant::now());
                    if due {
                        *deadline = None;
                    }
                    due
                };
                if due {
                    let _ = tokio::task::spawn_blocking(trim_now).await;
                    me.trims.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        });
    }

    /// Trims done so far.
    pub fn trims(&self) -> u64 {
        self.trims.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Returns every free page of glibc's heap and arenas to the kernel.
pub fn trim_now() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_gets_one_trim_after_its_last_call() {
        let t = Arc::new(HeapTrim::default());
        t.after_burst();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        t.after_burst(); // pushes the deadline back
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(t.trims(), 0, "trimmed before the burst ended");
        tokio::time::sleep(Duration::from_millis(600)).await;
        wait_for_trims(&t, 1).await;
        assert_eq!(t.trims(), 1, "one trim after the burst");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(t.trims(), 1, "a burst is trimmed once");
        t.after_burst();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        wait_for_trims(&t, 2).await;
        assert_eq!(t.trims(), 2, "the next burst is trimmed too");
    }

    /// The trim runs on a blocking thread, in real time: waits up to ~1 s for `n`.
    async fn wait_for_trims(t: &HeapTrim, n: u64) {
        for _ in 0..1000 {
            if t.trims() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
            tokio::task::yield_now().await;
        }
    }
}
