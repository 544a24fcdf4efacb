//! Local-disk spill for streamed in-progress transactions (pgoutput protocol 2, `streaming`).
//!
//! The server sends a large transaction's changes before it knows whether it will commit. They
//! must not reach the target before the commit, and must not be held in memory, so each
//! top-level transaction gets an unlinked temporary file of length-prefixed raw pgoutput
//! messages. On Stream Commit the file is read back in order; on Stream Abort of the top-level
//! xid it is dropped. A subtransaction abort (ROLLBACK TO SAVEPOINT) truncates the file where
//! that subtransaction's first change was written: while a subtransaction is open its parent
//! cannot write, so everything after that point belongs to it or to its own (also aborted)
//! children. Postgres' own apply worker uses the same rule.

use std::collections::HashMap;
use std::io::{self, SeekFrom};
use std::path::PathBuf;

use bytes::Bytes;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader, BufWriter};

const BUFFER_SIZE: usize = 256 * 1024;

/// The files are written through tokio's file type: each write past the buffer runs on the
/// blocking pool, never on the thread that drives the replication connection.
struct SpillFile {
    writer: BufWriter<File>,
    len: u64,
    /// Where each subtransaction's first change starts, in order of appearance.
    subxacts: Vec<(u32, u64)>,
}

/// Spill files of the streamed transactions not yet committed or aborted.
pub struct SpillStore {
    dir: PathBuf,
    open: HashMap<u32, SpillFile>,
}

impl SpillStore {
    /// A store whose files go to `dir` (the system's temporary directory when none).
    pub fn new(dir: Option<PathBuf>) -> Self {
        SpillStore { dir: dir.unwrap_or_else(std::env::temp_dir), open: HashMap::new() }
    }

    /// Appends one raw message of subtransaction `subxid` of top-level transaction `xid`.
    pub async fn append(&mut self, xid: u32, subxid: u32, message: &[u8]) -> io::Result<()> {
        if !self.open.contains_key(&xid) {
            let dir = self.dir.clone();
            let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
                .await
                .map_err(io::Error::other)??;
            self.open.insert(
                xid,
                SpillFile {
                    writer: BufWriter::with_capacity(BUFFER_SIZE, File::from_std(file)),
                    len: 0,
                    subxacts: Vec::new(),
                },
            );
        }
        let file = self.open.get_mut(&xid).expect("inserted above");
        if subxid != xid && !file.subxacts.iter().any(|&(s, _)| s == subxid) {
            file.subxacts.push((subxid, file.len));
        }
        let len = u32::try_from(message.len()).map_err(|_| io::Error::other("message over 4 GiB"))?;
        file.writer.write_all(&len.to_be_bytes()).await?;
        file.writer.write_all(message).await?;
        file.len += 4 + message.len() as u64;
        Ok(())
    }

    /// Drops a whole transaction (`subxid == xid`) or the changes of one subtransaction and
    /// everything written after it.
    pub async fn abort(&mut self, xid: u32, subxid: u32) -> io::Result<()> {
        if subxid == xid {
            self.open.remove(&xid);
            return Ok(());
        }
        let Some(file) = self.open.get_mut(&xid) else { return Ok(()) };
        let Some(index) = file.subxacts.iter().position(|&(s, _)| s == subxid) else { return Ok(()) };
        let offset = file.subxacts[index].1;
        file.subxacts.truncate(index);
        file.writer.flush().await?;
        let inner = file.writer.get_mut();
        inner.set_len(offset).await?;
        inner.seek(SeekFrom::Start(offset)).await?;
        file.len = offset;
        Ok(())
    }

    /// Hands over a committed transaction's messages for replay; `None` when nothing was spilled.
    pub async fn take(&mut self, xid: u32) -> io::Result<Option<SpillReader>> {
        let Some(mut file) = self.open.remove(&xid) else { return Ok(None) };
        file.writer.flush().await?;
        let mut inner = file.writer.into_inner();
        inner.seek(SeekFrom::Start(0)).await?;
        Ok(Some(SpillReader { reader: BufReader::with_capacity(BUFFER_SIZE, inner.take(file.len)) }))
    }

    /// Bytes held on disk by open transactions.
    pub fn bytes_spilled(&self) -> u64 {
        self.open.values().map(|f| f.len).sum()
    }

    /// Forgets every open transaction (the connection was lost; the server will resend them).
    pub fn clear(&mut self) {
        self.open.clear();
    }
}

/// Reads a spilled transaction back, one message at a time.
pub struct SpillReader {
    reader: BufReader<tokio::io::Take<File>>,
}

impl SpillReader {
    /// The next message in order; none at the end.
    pub async fn next_message(&mut self) -> io::Result<Option<Bytes>> {
        let mut len = [0u8; 4];
        match self.reader.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut message = vec![0u8; u32::from_be_bytes(len) as usize];
        self.reader.read_exact(&mut message).await?;
        Ok(Some(Bytes::from(message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(store: &mut SpillStore, xid: u32) -> Vec<Vec<u8>> {
        let mut reader = store.take(xid).await.unwrap().unwrap();
        let mut out = Vec::new();
        while let Some(m) = reader.next_message().await.unwrap() {
            out.push(m.to_vec());
        }
        out
    }

    #[tokio::test]
    async fn committed_transaction_replays_in_order() {
        let mut store = SpillStore::new(None);
        store.append(10, 10, b"a").await.unwrap();
        store.append(11, 11, b"other").await.unwrap();
        store.append(10, 10, b"bb").await.unwrap();
        assert_eq!(read_all(&mut store, 10).await, vec![b"a".to_vec(), b"bb".to_vec()]);
        assert_eq!(store.bytes_spilled(), 4 + 5);
    }

    #[tokio::test]
    async fn subtransaction_abort_drops_it_and_its_children_only() {
        let mut store = SpillStore::new(None);
        store.append(10, 10, b"keep1").await.unwrap();
        store.append(10, 20, b"sub1").await.unwrap();
        store.append(10, 21, b"child").await.unwrap();
        store.abort(10, 20).await.unwrap();
        store.append(10, 10, b"keep2").await.unwrap();
        store.append(10, 22, b"sub2").await.unwrap();
        assert_eq!(
            read_all(&mut store, 10).await,
            vec![b"keep1".to_vec(), b"keep2".to_vec(), b"sub2".to_vec()]
        );
    }

    #[tokio::test]
    async fn top_level_abort_drops_everything() {
        let mut store = SpillStore::new(None);
        store.append(10, 10, b"x").await.unwrap();
        store.abort(10, 10).await.unwrap();
        assert!(store.take(10).await.unwrap().is_none());
        assert_eq!(store.bytes_spilled(), 0);
    }
}
