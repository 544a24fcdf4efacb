//! The jsonl target: one JSON object per change (shape in `json.rs` and the README), to a file
//! or standard output. A batch is durable once written and, for files with `fsync = true`,
//! synced to disk. Replays after a restart append the replayed changes again: consumers
//! deduplicate by (`commit_lsn`, `ordinal`), which identifies a change exactly.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::{ErrorKind, TargetError};
use crate::targets::jsonl::config::JsonlConfig;
use crate::targets::{OpBatch, Receipt, Target};

pub struct JsonlTarget {
    out: Output,
    fsync: bool,
    buffer: Vec<u8>,
}

enum Output {
    Stdout(tokio::io::Stdout),
    File(tokio::fs::File),
}

impl JsonlTarget {
    pub async fn open(config: &JsonlConfig) -> Result<Self, TargetError> {
        let out = if config.path.as_os_str() == "-" {
            Output::Stdout(tokio::io::stdout())
        } else {
            let file =
                tokio::fs::OpenOptions::new().create(true).append(true).open(&config.path).await.map_err(
                    |e| {
                        TargetError::fatal(
                            "jsonl",
                            format!("cannot open {} (target.path)", config.path.display()),
                            e,
                        )
                    },
                )?;
            Output::File(file)
        };
        Ok(JsonlTarget { out, fsync: config.fsync, buffer: Vec::with_capacity(1 << 20) })
    }

    fn writer(&mut self) -> &mut (dyn AsyncWrite + Unpin + Send) {
        match &mut self.out {
            Output::Stdout(s) => s,
            Output::File(f) => f,
        }
    }
}

impl Target for JsonlTarget {
    type Op = Vec<u8>;

    async fn submit(&mut self, batch: OpBatch<Vec<u8>>) -> Result<Receipt, TargetError> {
        self.buffer.clear();
        for line in batch.ops {
            self.buffer.extend_from_slice(&line.op);
        }
        let io_error = |e: std::io::Error| TargetError {
            target: "jsonl",
            kind: ErrorKind::Fatal,
            message: "write failed".into(),
            source: Some(Box::new(e)),
        };
        let buffer = std::mem::take(&mut self.buffer);
        let writer = self.writer();
        writer.write_all(&buffer).await.map_err(io_error)?;
        writer.flush().await.map_err(io_error)?;
        self.buffer = buffer;
        if self.fsync {
            if let Output::File(file) = &mut self.out {
                file.sync_data().await.map_err(io_error)?;
            }
        }
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}
