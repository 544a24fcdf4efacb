//! The shutdown signal: one sender (SIGTERM/SIGINT, or a command's own end), any number of
//! listeners, each of which can ask whether shutdown was requested or wait for it.

use tokio::sync::watch;

/// A listener for the shutdown signal. Cloning it makes another listener of the same signal.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// Requests shutdown of every [`Shutdown`] made from it.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    /// A new signal: the trigger and its first listener.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// A signal that is never requested (one-shot commands, tests).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // The sender is dropped: `requested` then waits forever, as nothing can request it.
        drop(tx);
        Shutdown(rx)
    }

    /// True once shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is requested; never when nothing can request it any more.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|&stop| stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl ShutdownTrigger {
    /// Requests shutdown; every listener sees it.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Another listener of this signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}
