//! Connections to Postgres: the replication connection, spoken directly on `postgres-protocol`
//! because tokio-postgres has no replication mode, and ordinary SQL connections through
//! tokio-postgres for set-up and catalog queries.
//!
//! The replication connection starts with `replication=database`, authenticates (trust,
//! cleartext, md5, SCRAM-SHA-256), answers simple queries (IDENTIFY_SYSTEM, slot commands) and,
//! after START_REPLICATION, switches to CopyBoth: the server sends CopyData frames (XLogData,
//! keepalives) and we send CopyData frames (standby status updates) on the same socket.
//!
//! The same code opens ordinary sessions for bulk reads ([`ReplicationClient::connect_for_copy`]):
//! `COPY … TO STDOUT` sends one CopyData frame per row, and [`ReplicationClient::copy_out`] hands
//! the rows of a whole socket read to the caller in one pass, where tokio-postgres would make
//! each row a stream item of its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::ConnectionConfig;
use crate::error::{Error, Result};
use crate::pacing::{Pacer, Pacing};
use crate::tls;
use sluice_core::lsn::Lsn;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Session settings that make the server's text output unambiguous for the decoder.
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC \
    -c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8";

/// How much one read of the replication socket takes at most.
const READ_CHUNK: usize = 256 * 1024;

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One frame from the server as the replication connection sees it.
enum Frame {
    CopyData(Bytes),
    CopyBothResponse,
    Other(Message),
}

/// A connection opened with `replication=database` (or, for bulk reads, an ordinary session).
pub struct ReplicationClient {
    stream: Box<dyn Stream>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    addr: String,
    /// Set when the socket's reads are paced (TCP with a known receive buffer); used once
    /// the stream starts.
    pacing: Option<(Duration, usize)>,
    pacer: Option<Pacer>,
    /// Socket reads since the last [`ReplicationClient::take_reads`].
    reads: u64,
}

impl ReplicationClient {
    /// Connects, negotiates TLS as configured and logs in as a replication client; the stream's
    /// reads are paced over TCP as `pacing` says.
    pub async fn connect(config: &ConnectionConfig, pacing: Pacing) -> Result<Self> {
        Self::open(config, pacing, true).await
    }

    /// An ordinary session (no replication) with the same settings, for
    /// [`ReplicationClient::copy_out`] and simple queries; `config` names one host.
    pub async fn connect_for_copy(config: &ConnectionConfig) -> Result<Self> {
        Self::open(config, Pacing { max_wait: Duration::ZERO, receive_buffer: None }, false).await
    }

    async fn open(config: &ConnectionConfig, pacing: Pacing, replication: bool) -> Result<Self> {
        let addr = config.addr();
        let timed_out = || Error::Connect {
            addr: addr.clone(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        };
        let mut paced = None;
        let stream: Box<dyn Stream> = if let Some(path) = config.unix_socket() {
            let unix = tokio::time::timeout(config.connect_timeout, tokio::net::UnixStream::connect(&path))
                .await
                .map_err(|_| timed_out())?
                .map_err(|source| Error::Connect { addr: addr.clone(), source })?;
            Box::new(unix)
        } else {
            let (tcp, buffer) = tokio::time::timeout(config.connect_timeout, async {
                let mut last = None;
                for target in tokio::net::lookup_host((config.host.as_str(), config.port)).await? {
                    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                    // Before the handshake, so that the window is scaled for it.
                    let buffer = pacing.receive_buffer_for(&target);
                    if let Some(bytes) = buffer {
                        socket.set_recv_buffer_size(u32::try_from(bytes).unwrap_or(u32::MAX))?;
                    }
                    match socket.connect(target).await {
                        Ok(tcp) => return Ok((tcp, buffer)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| std::io::Error::other("the host name resolves to no address")))
            })
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| Error::Connect { addr: addr.clone(), source })?;
            paced = buffer.filter(|_| !pacing.max_wait.is_zero()).map(|bytes| (pacing.max_wait, bytes));
            tcp.set_nodelay(true).map_err(|source| Error::Connect { addr: addr.clone(), source })?;
            match tls::client_config(config)? {
                None => Box::new(tcp),
                Some(tls_config) => Box::new(start_tls(tcp, config, tls_config).await?),
            }
        };
        let mut client = ReplicationClient {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::new(),
            addr,
            pacing: paced,
            pacer: None,
            reads: 0,
        };
        tokio::time::timeout(config.connect_timeout, client.startup(config, replication)).await.map_err(
            |_| Error::Connect {
                addr: client.addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "login timed out"),
            },
        )??;
        Ok(client)
    }

    async fn startup(&mut self, config: &ConnectionConfig, replication: bool) -> Result<()> {
        let mut params = vec![
            ("user", config.user.as_str()),
            ("database", config.dbname.as_str()),
            ("application_name", "sluice"),
            ("options", SESSION_OPTIONS),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)
            .map_err(Error::ConnectionLost)?;
        self.flush().await?;
        let password = || {
            config.password.as_ref().map(|p| p.expose().as_bytes()).ok_or_else(|| Error::Auth {
                user: config.user.clone(),
                message: "the server asks for a password and none is configured".into(),
            })
        };
        loop {
            match self.read_frame().await? {
                Frame::Other(Message::AuthenticationOk) => {}
                Frame::Other(Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password()?, &mut self.write_buf)
                        .map_err(Error::ConnectionLost)?;
                    self.flush().await?;
                }
                Frame::Other(Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(config.user.as_bytes(), password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)
                        .map_err(Error::ConnectionLost)?;
                    self.flush().await?;
                }
                Frame::Other(Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechanisms)
                        .map_err(Error::ConnectionLost)?
                    {
                        scram_offered |= m == SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(Error::Auth {
                            user: config.user.clone(),
                            message: "the server offers no SASL mechanism sluice supports (SCRAM-SHA-256)"
                                .into(),
                        });
                    }
                    self.scram(config, password()?).await?;
                }
                Frame::Other(Message::ErrorResponse(body)) => {
                    let err = server_error(body.fields());
                    return Err(match err {
                        Error::Server { code, message, .. } if code.starts_with("28") => Error::Auth {
                            user: config.user.clone(),
                            message: format!("{message} (SQLSTATE {code})"),
                        },
                        other => other,
                    });
                }
                Frame::Other(Message::ReadyForQuery(_)) => return Ok(()),
                Frame::Other(
                    Message::ParameterStatus(_) | Message::BackendKeyData(_) | Message::NoticeResponse(_),
                ) => {}
                Frame::Other(_) => {
                    return Err(Error::Auth {
                        user: config.user.clone(),
                        message: "the server asks for an authentication method sluice does not support"
                            .into(),
                    })
                }
                Frame::CopyData(_) | Frame::CopyBothResponse => {
                    return Err(Error::protocol(Lsn::ZERO, "copy data during login"));
                }
            }
        }
    }

    async fn scram(&mut self, config: &ConnectionConfig, password: &[u8]) -> Result<()> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write_buf)
            .map_err(Error::ConnectionLost)?;
        self.flush().await?;
        let auth_error = |message: String| Error::Auth { user: config.user.clone(), message };
        match self.read_frame().await? {
            Frame::Other(Message::AuthenticationSaslContinue(body)) => {
                scram.update(body.data()).map_err(|e| auth_error(e.to_string()))?;
            }
            Frame::Other(Message::ErrorResponse(body)) => {
                return Err(auth_error(error_message(body.fields())))
            }
            _ => return Err(auth_error("unexpected message during SCRAM".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf).map_err(Error::ConnectionLost)?;
        self.flush().await?;
        match self.read_frame().await? {
            Frame::Other(Message::AuthenticationSaslFinal(body)) => {
                scram.finish(body.data()).map_err(|e| auth_error(e.to_string()))
            }
            Frame::Other(Message::ErrorResponse(body)) => Err(auth_error(error_message(body.fields()))),
            _ => Err(auth_error("unexpected message during SCRAM".into())),
        }
    }

    /// Runs one simple-protocol command and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.write_buf).map_err(Error::ConnectionLost)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_frame().await? {
                Frame::Other(Message::DataRow(row)) => {
                    let buf = row.buffer();
                    let mut ranges = row.ranges();
                    let mut values = Vec::new();
                    while let Some(range) = fallible_iterator::FallibleIterator::next(&mut ranges)
                        .map_err(Error::ConnectionLost)?
                    {
                        values.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Frame::Other(Message::ErrorResponse(body)) => error = Some(server_error(body.fields())),
                Frame::Other(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                Frame::Other(_) => {}
                Frame::CopyData(_) | Frame::CopyBothResponse => {
                    return Err(Error::protocol(Lsn::ZERO, "copy data in reply to a simple query"));
                }
            }
        }
    }

    /// Runs `statements` (one simple query; a `COPY … TO STDOUT` among them) and hands the
    /// payload of every CopyData frame to `data`: the frames already buffered in one pass, many
    /// rows per socket read. The first error (the server's, or `data`'s) ends it; after an error
    /// the session is in no known state and is to be dropped.
    pub async fn copy_out<E: From<Error>>(
        &mut self,
        statements: &str,
        mut data: impl FnMut(&[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        frontend::query(statements, &mut self.write_buf).map_err(Error::ConnectionLost)?;
        self.flush().await?;
        let mut error = None;
        loop {
            // The complete CopyData frames at the buffer's start (`read_frame` below reports a
            // malformed one).
            let mut at = 0;
            while let Some((b'd', len)) = frame_header(&self.read_buf[at..]) {
                let end = at + 1 + len;
                if len < 4 || end > self.read_buf.len() {
                    break;
                }
                data(&self.read_buf[at + 5..end])?;
                at = end;
            }
            self.read_buf.advance(at);
            match self.read_frame().await? {
                Frame::CopyData(payload) => data(&payload)?,
                Frame::Other(Message::ErrorResponse(body)) => {
                    error.get_or_insert(server_error(body.fields()));
                }
                Frame::Other(Message::ReadyForQuery(_)) => return error.map_or(Ok(()), |e| Err(e.into())),
                Frame::Other(_) => {}
                Frame::CopyBothResponse => {
                    return Err(Error::protocol(Lsn::ZERO, "CopyBothResponse in reply to a COPY").into())
                }
            }
        }
    }

    /// Sends START_REPLICATION and waits until the server switches to streaming.
    pub async fn start_replication(&mut self, command: &str) -> Result<()> {
        frontend::query(command, &mut self.write_buf).map_err(Error::ConnectionLost)?;
        self.flush().await?;
        loop {
            match self.read_frame().await? {
                Frame::CopyBothResponse => {
                    self.pacer = self.pacing.map(|(max_wait, buffer)| Pacer::new(max_wait, buffer));
                    return Ok(());
                }
                Frame::Other(Message::ErrorResponse(body)) => {
                    let err = server_error(body.fields());
                    // The server follows an error with ReadyForQuery; the connection is dropped anyway.
                    return Err(err);
                }
                Frame::Other(_) => {}
                Frame::CopyData(_) => {
                    return Err(Error::protocol(Lsn::ZERO, "copy data before CopyBothResponse"))
                }
            }
        }
    }

    /// The next CopyData payload while streaming; `None` when the server ended the stream.
    ///
    /// Cancel-safe: a frame is taken out of the buffer only once it is complete.
    pub async fn recv_copy_data(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.read_frame().await? {
                Frame::CopyData(data) => return Ok(Some(data)),
                Frame::Other(Message::CopyDone) => return Ok(None),
                Frame::Other(Message::ErrorResponse(body)) => return Err(server_error(body.fields())),
                Frame::Other(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Frame::Other(Message::CommandComplete(_) | Message::ReadyForQuery(_)) => return Ok(None),
                Frame::Other(_) | Frame::CopyBothResponse => {
                    return Err(Error::protocol(Lsn::ZERO, "unexpected message while streaming"));
                }
            }
        }
    }

    /// Sends a standby status update ('r'): what was received, what is durable, what is applied.
    pub async fn send_standby_status(
        &mut self,
        received: Lsn,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(received.0);
        body.put_u64(flushed.0);
        body.put_u64(flushed.0);
        body.put_i64(now_pg_micros());
        body.put_u8(u8::from(reply_requested));
        frontend::CopyData::new(body.freeze()).map_err(Error::ConnectionLost)?.write(&mut self.write_buf);
        self.flush().await
    }

    /// Socket reads since the last call, for the reads metric.
    pub fn take_reads(&mut self) -> u64 {
        std::mem::take(&mut self.reads)
    }

    /// Whether the stream's reads are paced (TCP with a known receive buffer and a wait).
    pub fn paced(&self) -> Option<(Duration, usize)> {
        self.pacing
    }

    /// True when a whole frame is already buffered, so reading it will not wait for the network.
    pub fn has_buffered_frame(&self) -> bool {
        self.read_buf.len() >= 5 && {
            let len =
                u32::from_be_bytes([self.read_buf[1], self.read_buf[2], self.read_buf[3], self.read_buf[4]])
                    as usize;
            self.read_buf.len() > len
        }
    }

    /// Ends the stream and the session politely (CopyDone, Terminate).
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.write_buf);
        frontend::terminate(&mut self.write_buf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.write_buf).await.map_err(Error::ConnectionLost)?;
        self.write_buf.clear();
        self.stream.flush().await.map_err(Error::ConnectionLost)
    }

    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some((tag, len)) = frame_header(&self.read_buf) {
                if len < 4 {
                    return Err(Error::protocol(Lsn::ZERO, format!("frame length {len} below 4")));
                }
                if self.read_buf.len() > len {
                    match tag {
                        b'd' => {
                            let mut frame = self.read_buf.split_to(len + 1);
                            frame.advance(5);
                            return Ok(Frame::CopyData(frame.freeze()));
                        }
                        b'W' => {
                            self.read_buf.advance(len + 1);
                            return Ok(Frame::CopyBothResponse);
                        }
                        _ => {
                            let message =
                                Message::parse(&mut self.read_buf).map_err(Error::ConnectionLost)?;
                            return message
                                .map(Frame::Other)
                                .ok_or_else(|| Error::protocol(Lsn::ZERO, "incomplete frame"));
                        }
                    }
                }
                self.read_buf.reserve(len + 1 - self.read_buf.len());
            }
            // Room for a large read: once the frames split off have used the buffer up, a read
            // into what is left would take a few bytes per system call.
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
                self.read_buf.reserve(READ_CHUNK);
            }
            if let Some(at) = self.pacer.as_ref().and_then(Pacer::next_read) {
                tokio::time::sleep_until(at).await;
            }
            let n = self.stream.read_buf(&mut self.read_buf).await.map_err(Error::ConnectionLost)?;
            self.reads += 1;
            if let Some(pacer) = &mut self.pacer {
                pacer.read(n, tokio::time::Instant::now());
            }
            if n == 0 {
                return Err(Error::ConnectionLost(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} closed the connection", self.addr),
                )));
            }
        }
    }
}

/// The tag and length (the length field's own four bytes included, the tag not) of the frame
/// at the start of `buf`, once its five header bytes are there.
fn frame_header(buf: &[u8]) -> Option<(u8, usize)> {
    match *buf.get(..5)? {
        [tag, a, b, c, d] => Some((tag, u32::from_be_bytes([a, b, c, d]) as usize)),
        _ => None,
    }
}

async fn start_tls(
    mut tcp: TcpStream,
    config: &ConnectionConfig,
    tls_config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let addr = config.addr();
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(|source| Error::Connect { addr: addr.clone(), source })?;
    let answer = tcp.read_u8().await.map_err(|source| Error::Connect { addr: addr.clone(), source })?;
    if answer != b'S' {
        return Err(Error::Tls {
            addr,
            reason: "the server does not accept TLS connections (ssl = off)".into(),
        });
    }
    let connector = tokio_rustls::TlsConnector::from(tls_config);
    connector
        .connect(tls::server_name(config)?, tcp)
        .await
        .map_err(|e| Error::Tls { addr, reason: e.to_string() })
}

/// Opens an ordinary SQL session with the same settings (TLS included).
pub async fn connect_sql(config: &ConnectionConfig) -> Result<tokio_postgres::Client> {
    connect_sql_as(config, "sluice").await
}

/// [`connect_sql`], named `application_name` in `pg_stat_activity`.
pub async fn connect_sql_as(
    config: &ConnectionConfig,
    application_name: &str,
) -> Result<tokio_postgres::Client> {
    Ok(connect_sql_choosing(config, application_name).await?.0)
}

/// Connects to the first of the configured hosts that accepts the connection and suits
/// `target_session_attrs`; returns the session and the settings of that one host. When none
/// suits (a failover in progress: the primary down, the standby not yet promoted), the error is
/// a connection error, which callers retry.
pub async fn connect_sql_choosing(
    config: &ConnectionConfig,
    application_name: &str,
) -> Result<(tokio_postgres::Client, ConnectionConfig)> {
    if !config.chooses() {
        return Ok((connect_one(config, application_name).await?, config.clone()));
    }
    let servers =
        config.servers().map_err(|reason| Error::Setup(format!("source.connection.host: {reason}")))?;
    let attrs = config.target_session_attrs;
    let mut passed = Vec::new();
    for (host, port) in servers {
        let one = config.single(&host, port);
        let client = match connect_one(&one, application_name).await {
            Ok(client) => client,
            // Wrong credentials or certificates are not cured by another host.
            Err(e @ (Error::Auth { .. } | Error::Tls { .. })) => return Err(e),
            Err(e) => {
                passed.push(format!("{}: {}", one.addr(), crate::error::Chain(&e)));
                continue;
            }
        };
        let in_recovery = match client.query_one("SELECT pg_catalog.pg_is_in_recovery()", &[]).await {
            Ok(row) => row.get::<_, bool>(0),
            Err(e) => {
                passed.push(format!("{}: {e}", one.addr()));
                continue;
            }
        };
        if attrs.accepts(in_recovery) {
            return Ok((client, one));
        }
        passed.push(format!("{}: {}", one.addr(), if in_recovery { "a standby" } else { "a primary" }));
    }
    Err(Error::Connect {
        addr: config.addr(),
        source: std::io::Error::other(format!(
            "no host suits target_session_attrs = \"{}\" ({})",
            attrs.name(),
            passed.join("; ")
        )),
    })
}

async fn connect_one(config: &ConnectionConfig, application_name: &str) -> Result<tokio_postgres::Client> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&config.host)
        .port(config.port)
        .user(&config.user)
        .dbname(&config.dbname)
        .application_name(application_name)
        .connect_timeout(config.connect_timeout)
        .options(SESSION_OPTIONS);
    if let Some(password) = &config.password {
        pg.password(password.expose());
    }
    let map_err = |e: tokio_postgres::Error| classify_sql_error(config, e);
    let client = match tls::client_config(config)? {
        None => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(map_err)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "SQL connection ended");
                }
            });
            client
        }
        Some(tls_config) => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            let (client, connection) = pg.connect(tls).await.map_err(map_err)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "SQL connection ended");
                }
            });
            client
        }
    };
    Ok(client)
}

/// tokio-postgres reports connection-phase failures by kind only in its message; sort them into
/// the connector's kinds so that retry and messages behave the same on both connections.
fn classify_sql_error(config: &ConnectionConfig, e: tokio_postgres::Error) -> Error {
    if let Some(db) = e.as_db_error() {
        if db.code().code().starts_with("28") {
            return Error::Auth {
                user: config.user.clone(),
                message: format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            };
        }
        return Error::Sql(e);
    }
    let text = e.to_string();
    if text.starts_with("error performing TLS handshake") {
        let reason = std::error::Error::source(&e).map(ToString::to_string).unwrap_or(text);
        Error::Tls { addr: config.addr(), reason }
    } else if text.starts_with("authentication error") || text.starts_with("invalid configuration") {
        let reason = std::error::Error::source(&e).map(ToString::to_string).unwrap_or(text);
        // The same words as the replication connection's for the same failure.
        let message = if reason == "password missing" {
            "the server asks for a password and none is configured".to_owned()
        } else {
            reason
        };
        Error::Auth { user: config.user.clone(), message }
    } else {
        Error::Connect { addr: config.addr(), source: std::io::Error::other(e) }
    }
}

fn server_error(mut fields: ErrorFields<'_>) -> Error {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    while let Ok(Some(field)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'D' => detail = Some(String::from_utf8_lossy(field.value_bytes()).into_owned()),
            _ => {}
        }
    }
    Error::Server { code, message, detail }
}

fn error_message(fields: ErrorFields<'_>) -> String {
    server_error(fields).to_string()
}

/// Now, in microseconds since 2000-01-01 UTC, as the protocol counts time.
pub fn now_pg_micros() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    unix.as_micros() as i64 - PG_EPOCH_OFFSET_MICROS
}
