//! Throwaway Postgres clusters on 127.0.0.1 for the quick-start, the benchmark and the tests:
//! `initdb` into a temp dir, `wal_level=logical`, a free port, started with `pg_ctl`. Postgres
//! refuses to run as root, so as root the server runs as the `postgres` OS user (`runuser`).

use std::io;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sluice_postgres::ConnectionConfig;

/// The directory holding `initdb`, `pg_ctl`, `pg_recvlogical`…: `SLUICE_TEST_PG_BIN`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin_dir() -> io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("SLUICE_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    system_bin_dir()
}

/// The system's Postgres programs: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`. Their clients (psql, pg_recvlogical) serve a server directory
/// that has none (the embedded-postgres packages of other versions hold only the server).
fn system_bin_dir() -> io::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    candidates.pop().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no Postgres server binaries (initdb) found; install postgresql or set SLUICE_TEST_PG_BIN",
        )
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A free TCP port on 127.0.0.1 (free when asked; start retries on a clash).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings for a new cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` settings.
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines placed before the default trust lines.
    pub hba: Vec<String>,
    /// Skip `wal_level=logical` (to test the error for it).
    pub wal_level_replica: bool,
    /// Files written into the data directory, owned by the server, mode 0600 (TLS keys).
    pub files: Vec<(String, Vec<u8>)>,
    /// The server's `bin` directory, instead of [`pg_bin_dir`].
    pub bin: Option<PathBuf>,
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct LocalPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_root: bool,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
}

impl LocalPostgres {
    /// Creates, configures and starts a cluster in a temporary directory.
    pub fn start(options: &ClusterOptions) -> io::Result<Self> {
        let bin = match &options.bin {
            Some(bin) => bin.clone(),
            None => pg_bin_dir()?,
        };
        let dir = tempfile::Builder::new().prefix("sluice-pg-").tempdir()?;
        let as_root = running_as_root();
        if as_root {
            run_checked(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()))?;
        }
        let mut cluster = LocalPostgres { dir, bin, as_root, port: 0 };
        let data = cluster.data_dir();
        run_checked(cluster.server_command("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]))?;
        if !options.hba.is_empty() {
            let default = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap_or_default();
            let lines: Vec<&str> = default
                .lines()
                .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
                .collect();
            let hba = format!("{}\n{}\n", options.hba.join("\n"), lines.join("\n"));
            cluster.write_as_owner(&data.join("pg_hba.conf"), &hba)?;
        }
        for (name, contents) in &options.files {
            let path = data.join(name);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if cluster.as_root {
                run_checked(Command::new("chown").arg("postgres:postgres").arg(&path))?;
            }
        }
        let mut conf = String::from(
            "listen_addresses = '127.0.0.1'\nmax_replication_slots = 64\nmax_wal_senders = 64\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nwal_sender_timeout = 60s\nlog_min_messages = warning\n",
        );
        conf.push_str(&format!("unix_socket_directories = '{}'\n", cluster.dir.path().display()));
        if !options.wal_level_replica {
            conf.push_str("wal_level = logical\n");
        }
        for (key, value) in &options.settings {
            conf.push_str(&format!("{key} = '{value}'\n"));
        }
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf"))?;
        existing.push_str(&conf);
        cluster.write_as_owner(&data.join("postgresql.conf"), &existing)?;
        cluster.start_on_a_free_port()?;
        Ok(cluster)
    }

    /// Starts the server on a free port, trying another when the port was taken meanwhile.
    fn start_on_a_free_port(&mut self) -> io::Result<()> {
        let mut last_error = None;
        for _ in 0..3 {
            self.port = free_port()?;
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("postgres did not start")))
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let log = self.dir.path().join("postgres.log");
        run_checked(
            self.server_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start", "-o"])
                .arg(format!("-c port={}", self.port)),
        )
        .map(drop)
        .map_err(|e| {
            io::Error::other(format!(
                "{e}; server log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        })
    }

    /// Stops the server at once (as a crash would) or cleanly.
    pub fn stop(&self, mode: &str) -> io::Result<()> {
        run_checked(
            self.server_command("pg_ctl").arg("-D").arg(self.data_dir()).args(["-w", "-m", mode, "stop"]),
        )
        .map(drop)
    }

    /// Starts the server again on the same port after `stop`.
    pub fn restart(&self) -> io::Result<()> {
        self.pg_ctl_start()
    }

    /// A physical standby of this cluster, streaming from it through the physical slot
    /// `slot` (created here), with `settings` added to its configuration. This cluster is
    /// stopped cleanly for the copy of its data directory and started again: the embedded
    /// server packages have no pg_basebackup.
    pub fn standby(&self, slot: &str, settings: &[(&str, &str)]) -> io::Result<LocalPostgres> {
        self.psql("postgres", &format!("SELECT pg_create_physical_replication_slot('{slot}')"))?;
        self.stop("fast")?;
        let dir = tempfile::Builder::new().prefix("sluice-pg-").tempdir()?;
        let copied =
            run_checked(Command::new("cp").arg("-a").arg(self.data_dir()).arg(dir.path().join("data")))
                .and_then(|_| {
                    if self.as_root {
                        run_checked(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()))?;
                    }
                    Ok(())
                });
        self.pg_ctl_start()?;
        copied?;
        let mut standby = LocalPostgres { dir, bin: self.bin.clone(), as_root: self.as_root, port: 0 };
        let data = standby.data_dir();
        // The copy holds the primary's slots; a standby keeps none of its own.
        for entry in std::fs::read_dir(data.join("pg_replslot"))? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(path)?;
            }
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str(&format!(
            "unix_socket_directories = '{}'
primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name=standby'
             primary_slot_name = '{slot}'
hot_standby = on
hot_standby_feedback = on
",
            standby.dir.path().display(),
            self.port
        ));
        for (key, value) in settings {
            conf.push_str(&format!(
                "{key} = '{value}'
"
            ));
        }
        standby.write_as_owner(&data.join("postgresql.conf"), &conf)?;
        standby.write_as_owner(&data.join("standby.signal"), "")?;
        standby.start_on_a_free_port()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary and waits until it is one.
    pub fn promote(&self) -> io::Result<()> {
        run_checked(
            self.server_command("pg_ctl").arg("-D").arg(self.data_dir()).args(["-w", "-t", "60", "promote"]),
        )
        .map(drop)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the server's Unix-domain socket (`host` for a connection over it).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A Postgres client program (psql, pg_recvlogical, pgbench): run as the current user;
    /// the system's when the server's directory has none.
    pub fn client_command(&self, program: &str) -> Command {
        let own = self.bin.join(program);
        match system_bin_dir() {
            Ok(system) if !own.exists() => Command::new(system.join(program)),
            _ => Command::new(own),
        }
    }

    /// A server program. Beside a `lib` holding its own libpq (an embedded-postgres package),
    /// it runs with that `lib` on the library path.
    fn server_command(&self, program: &str) -> Command {
        let lib = self.bin.parent().map(|p| p.join("lib")).filter(|lib| lib.join("libpq.so.5").exists());
        let mut cmd = if self.as_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", "env"]);
            cmd
        } else {
            Command::new("env")
        };
        if let Some(lib) = lib {
            cmd.arg(format!("LD_LIBRARY_PATH={}", lib.display()));
        }
        cmd.arg(self.bin.join(program));
        cmd
    }

    fn write_as_owner(&self, path: &Path, text: &str) -> io::Result<()> {
        std::fs::write(path, text)?;
        if self.as_root {
            run_checked(Command::new("chown").arg("postgres:postgres").arg(path))?;
        }
        Ok(())
    }

    /// Runs SQL with psql as the superuser and returns its unaligned output.
    pub fn psql(&self, dbname: &str, sql: &str) -> io::Result<String> {
        let out = run_checked(
            self.client_command("psql")
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-d")
                .arg(dbname)
                .arg("-c")
                .arg(sql),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) -> io::Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")).map(drop)
    }

    /// Connection settings for `dbname` as the superuser (trust auth).
    pub fn connection(&self, dbname: &str) -> ConnectionConfig {
        ConnectionConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            target_session_attrs: Default::default(),
            user: "postgres".into(),
            password: None,
            dbname: dbname.into(),
            sslmode: Default::default(),
            sslrootcert: None,
            connect_timeout: std::time::Duration::from_secs(10),
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )))
    }
}
