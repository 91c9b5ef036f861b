//! Rollback for operations built from steps (RunPodSandbox, CreateContainer): each
//! finished step pushes what undoes it, and a failure runs them in reverse. Undo steps
//! are blocking work (unmounts, rmdirs, namespace removal: run on a blocking thread)
//! or async work (a shim call). `commit` forgets them once the operation stands.

use std::future::Future;
use std::pin::Pin;

enum Step {
    Blocking(Box<dyn FnOnce() + Send>),
    Async(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// What undoes the finished steps of one operation.
#[derive(Default)]
pub struct Undo(Vec<Step>);

impl Undo {
    /// Remembers blocking work that undoes a finished step.
    pub fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Step::Blocking(Box::new(f)));
    }

    /// Remembers async work that undoes a finished step.
    pub fn push_async(&mut self, f: impl Future<Output = ()> + Send + 'static) {
        self.0.push(Step::Async(Box::pin(f)));
    }

    /// Undoes every remembered step, last first.
    pub async fn run(self) {
        for step in self.0.into_iter().rev() {
            match step {
                Step::Blocking(f) => {
                    let _ = tokio::task::spawn_blocking(f).await;
                }
                Step::Async(f) => f.await,
            }
        }
    }

    /// The operation succeeded: nothing to undo.
    pub fn commit(mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn undo_runs_in_reverse_and_commit_forgets() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut u = Undo::default();
        for i in 0..3 {
            let l = log.clone();
            if i == 1 {
                u.push_async(async move { l.lock().unwrap().push(i) });
            } else {
                u.push(move || l.lock().unwrap().push(i));
            }
        }
        u.run().await;
        assert_eq!(*log.lock().unwrap(), [2, 1, 0]);
        let mut u = Undo::default();
        let l = log.clone();
        u.push(move || l.lock().unwrap().push(9));
        u.commit();
        assert_eq!(log.lock().unwrap().len(), 3);
    }
}
