//! The manifest directory: the embedded default source.
//!
//! Every `*.yaml` / `*.yml` file under the directory (recursively, in path order) is decoded with
//! [`decode_manifests`]. Hidden files and directories (names starting with `.`, which also covers
//! editor files such as `.#x.yaml` and `.x.yaml.swp`) and backup files (`x~`, `#x#`) are skipped;
//! symlinked files are followed, symlinked directories are not (they could loop). Kubernetes
//! ConfigMap volumes work as they are: their files are top-level symlinks into a hidden directory
//! that is swapped atomically on update.
//!
//! The directory is loaded once as a list (`Init`, `InitApply`…, `InitDone`), then watched with the
//! platform's event-driven watcher (a 500 ms poll only if that cannot be set up). A burst of file
//! system events is debounced (20 ms of quiet, at most 1 s) into one rescan, so editors that write
//! through a temporary file and a rename are seen once, complete; once every file written has
//! been closed by its writer, 2 ms of quiet do (only a burst's next file is worth waiting for).
//! A rescan reads only the files the events name (an edit in a directory of thousands costs that
//! file); lost events, directories, symlinks and hidden entries other than plain files (a
//! ConfigMap volume's `..data` swap) make it read the whole directory. It re-decodes only the files whose content hash changed and emits
//! only the differences: `Apply` for new or changed objects, `Delete` for objects no file defines
//! any more.
//!
//! # Rules
//!
//! * **The last good configuration keeps serving.** A file with decode problems keeps every object
//!   it previously defined that it no longer yields: the missing object may well be the document
//!   that just became malformed. Such objects are deleted only once the file decodes cleanly
//!   without them, or the file is removed. The same holds for a file that cannot be read, for files
//!   under a directory that cannot be read, and for the whole directory if it becomes unreadable.
//! * **Later files win.** When two files define the same object, the one later in path order wins
//!   (a warning names both). If it leaves that file, the remaining definition is applied again
//!   rather than the object being deleted.
//! * **Problems are reported once.** Each new problem is logged (`code = "E3002"`) and counted in
//!   the error metric once; rescans that find the same problem again stay quiet. All current
//!   problems are available from [`ManifestSource::problems`].

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::hash::Hasher;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fsm_catalog::{CatalogEvent, DecodeError, MeshObject, ObjectKey, Scope, decode_manifests};
use fsm_errcode::{ErrCode, HasErrCode};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Editors and copies write a file, or many files, in steps a few milliseconds apart; a rescan
/// waits for this much silence. Every change waits this long before it reaches a proxy, so it
/// is no longer than a burst's gaps need (a half-written file is only a problem reported until
/// the next event, the last good configuration serving meanwhile).
const QUIET: Duration = Duration::from_millis(20);
/// The quiet awaited once every file written has been closed by its writer: the writes are
/// complete, and only the next file of a burst (a copy of a directory) is worth waiting for.
const SETTLED_QUIET: Duration = Duration::from_millis(2);
/// A file rewritten continuously must still be picked up eventually.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// Used only when the event-driven watcher cannot be set up (e.g. inotify limits exhausted).
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Reads `dir` once, by the rules the watching source applies (recursive, path order, hidden and
/// backup files skipped, later files win), for tools that need a directory's mesh without
/// watching it (`fsm translate`). Returns the objects the catalog would be given and every
/// problem found (file, document, object, field, message).
pub fn read_manifest_dir(dir: &Path) -> Result<(Vec<MeshObject>, Vec<DecodeError>), SourceError> {
    if !dir.is_dir() {
        return Err(SourceError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let (state, events) = State::load(dir.to_path_buf())?;
    let objects = events
        .into_iter()
        .filter_map(|event| match event {
            CatalogEvent::InitApply(object) => Some(object),
            _ => None,
        })
        .collect();
    Ok((objects, state.problems))
}

/// Why the manifest source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read manifest directory {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("manifest path {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot watch manifest directory {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// A watched directory of Kubernetes manifests. Dropping it stops the watch.
#[must_use = "dropping the ManifestSource stops watching the directory"]
#[derive(Debug)]
pub struct ManifestSource {
    problems: Arc<Mutex<Vec<DecodeError>>>,
    task: JoinHandle<()>,
}

impl ManifestSource {
    /// Loads `dir` once before returning, then sends `Init`, `InitApply` for every object,
    /// `InitDone` and `Synced`, and keeps watching it and sends `Apply` / `Delete` for every
    /// change. Every send waits for room in the bounded channel: a consumer that falls behind
    /// slows the source down instead of letting events pile up in memory.
    ///
    /// Fails if `dir` or any directory under it cannot be read, or if it cannot be watched.
    /// Watching stops when the `ManifestSource` is dropped or the receiver of `events` is closed.
    pub async fn spawn(
        dir: PathBuf,
        events: Sender<CatalogEvent>,
    ) -> Result<ManifestSource, SourceError> {
        Self::spawn_with(dir, events, Backend::EventDriven).await
    }

    async fn spawn_with(
        dir: PathBuf,
        events: Sender<CatalogEvent>,
        backend: Backend,
    ) -> Result<ManifestSource, SourceError> {
        let metadata =
            tokio::fs::metadata(&dir)
                .await
                .map_err(|source| SourceError::Unreadable {
                    path: dir.clone(),
                    source,
                })?;
        if !metadata.is_dir() {
            return Err(SourceError::NotADirectory { path: dir });
        }
        let wake = Arc::new(Notify::new());
        let pending = Arc::new(Mutex::new(Pending::default()));
        let root = dir.clone();
        let setup_wake = Arc::clone(&wake);
        let setup_pending = Arc::clone(&pending);
        // Setting up a recursive watch walks the tree, so it runs off the executor with the load.
        // Watching starts before the first scan so that nothing written in between is missed.
        let setup = tokio::task::spawn_blocking(move || {
            let watcher = start_watcher(&root, setup_wake, setup_pending, backend)?;
            let (state, initial) = State::load(root)?;
            Ok::<_, SourceError>((watcher, state, initial))
        });
        let (watcher, state, initial) = match setup.await {
            Ok(result) => result?,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => {
                return Err(SourceError::Unreadable {
                    path: dir,
                    source: io::Error::other(err),
                });
            }
        };
        tracing::info!(
            dir = %dir.display(),
            files = state.files.len(),
            objects = state.published.len(),
            problems = state.problems.len(),
            "loaded manifest directory"
        );
        let problems = Arc::new(Mutex::new(state.problems.clone()));
        let problems_for_task = Arc::clone(&problems);
        let task = tokio::spawn(async move {
            for event in initial {
                if crate::metrics::send(&events, event).await.is_err() {
                    return;
                }
            }
            watch(state, wake, pending, events, problems_for_task, watcher).await;
        });
        Ok(ManifestSource { problems, task })
    }

    /// Current problems (unreadable files and directories, documents that failed to decode), in
    /// path order, for the debug endpoint.
    pub fn problems(&self) -> Vec<DecodeError> {
        self.problems.lock().clone()
    }
}

impl Drop for ManifestSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Owns the watcher so that it lives exactly as long as the task.
async fn watch(
    mut state: State,
    wake: Arc<Notify>,
    pending: Arc<Mutex<Pending>>,
    events: Sender<CatalogEvent>,
    problems: Arc<Mutex<Vec<DecodeError>>>,
    _watcher: Box<dyn Watcher + Send>,
) {
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = events.closed() => return,
        }
        debounce(&wake, &pending).await;
        let work = std::mem::take(&mut *pending.lock());
        let rescan = tokio::task::spawn_blocking(move || {
            let batch = if work.full {
                state.rescan()
            } else {
                state.rescan_paths(&work.paths)
            };
            (state, batch)
        });
        let batch = match rescan.await {
            Ok((returned, batch)) => {
                state = returned;
                batch
            }
            Err(err) => {
                fsm_errcode::error!(ErrCode::E4150, error = %err, "manifest rescan failed; no longer watching the directory");
                return;
            }
        };
        for event in batch {
            if crate::metrics::send(&events, event).await.is_err() {
                return;
            }
        }
        // Published after the events so that whoever sees the problems also has the events.
        *problems.lock() = state.problems.clone();
    }
}

/// Waits until the file system has been quiet for [`QUIET`] ([`SETTLED_QUIET`] when no file is
/// being written), or [`MAX_DELAY`] has passed.
async fn debounce(wake: &Notify, pending: &Mutex<Pending>) {
    let deadline = Instant::now() + MAX_DELAY;
    loop {
        let quiet_until = (Instant::now() + pending.lock().quiet()).min(deadline);
        if tokio::time::timeout_at(quiet_until, wake.notified())
            .await
            .is_err()
            || Instant::now() >= deadline
        {
            return;
        }
    }
}

/// Which notify backend to try first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// The platform's event-driven watcher, falling back to polling if it cannot be set up.
    EventDriven,
    /// Lets tests exercise the fallback.
    #[cfg_attr(not(test), allow(dead_code))]
    Poll,
}

fn start_watcher(
    dir: &Path,
    wake: Arc<Notify>,
    pending: Arc<Mutex<Pending>>,
    backend: Backend,
) -> Result<Box<dyn Watcher + Send>, SourceError> {
    let handler = move |result: notify::Result<notify::Event>| match result {
        Ok(event) if is_noise(&event.kind) => {}
        Ok(event) => {
            {
                let mut pending = pending.lock();
                pending.full |= event.need_rescan() || event.paths.is_empty();
                pending.note_writes(&event);
                pending.paths.extend(event.paths);
            }
            wake.notify_one();
        }
        Err(err) => {
            // Typically an overflowed event queue: events were lost, so look at everything again.
            fsm_errcode::warn!(ErrCode::E4150, error = %err, "manifest watcher error; rescanning");
            pending.lock().full = true;
            wake.notify_one();
        }
    };
    let config = notify::Config::default().with_follow_symlinks(false);
    if backend == Backend::EventDriven {
        let recommended =
            notify::RecommendedWatcher::new(handler.clone(), config).and_then(|mut watcher| {
                watcher.watch(dir, RecursiveMode::Recursive)?;
                Ok(watcher)
            });
        match recommended {
            Ok(watcher) => return Ok(Box::new(watcher)),
            Err(err) => fsm_errcode::warn!(
                ErrCode::E4150,
                dir = %dir.display(),
                error = %err,
                interval_ms = POLL_INTERVAL.as_millis(),
                "event-driven watch unavailable; polling the manifest directory instead"
            ),
        }
    }
    let watch_error = |source| SourceError::Watch {
        path: dir.to_path_buf(),
        source,
    };
    let mut watcher = notify::PollWatcher::new(handler, config.with_poll_interval(POLL_INTERVAL))
        .map_err(watch_error)?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .map_err(watch_error)?;
    Ok(Box::new(watcher))
}

/// Opening and reading files (our own scans included) changes nothing; a write-close does.
fn is_noise(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(access) if *access != AccessKind::Close(AccessMode::Write))
}

/// Names never treated as manifests nor descended into.
fn is_ignored(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('.') || name.starts_with('#') || name.ends_with('~')
}

fn is_manifest(name: &OsStr) -> bool {
    Path::new(name)
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|ext| ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml"))
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// Warns once about an object defined in more than one file (`paths`, in path order).
fn note_duplicates(
    duplicates: &mut BTreeMap<ObjectKey, Vec<Arc<Path>>>,
    key: &ObjectKey,
    paths: Option<&Vec<Arc<Path>>>,
) {
    match paths {
        Some(paths) => {
            if duplicates.get(key) != Some(paths) {
                let winner = paths
                    .last()
                    .map(|path| path.display().to_string())
                    .unwrap_or_default();
                fsm_errcode::warn!(
                    ErrCode::E3002,
                    object = %key,
                    files = ?paths,
                    winner,
                    "object defined in more than one manifest file; the file later in path order wins"
                );
                duplicates.insert(key.clone(), paths.clone());
            }
        }
        None => {
            duplicates.remove(key);
        }
    }
}

/// The objects `file` defines, sorted.
fn defined_keys(file: Option<&FileState>) -> Vec<ObjectKey> {
    file.map(|f| f.objects.keys().cloned().collect())
        .unwrap_or_default()
}

/// A problem that concerns a whole file or directory rather than one document.
fn path_problem(path: &Path, message: String) -> DecodeError {
    DecodeError {
        file: path.display().to_string(),
        document: 0,
        line: 1,
        object: None,
        field: None,
        message,
    }
}

/// What one file currently contributes.
#[derive(Debug)]
struct FileState {
    /// `None` when the file could not be read, so that the next scan always retries it.
    hash: Option<u64>,
    /// Includes the objects kept from earlier versions while the file has problems. Shared with
    /// the effective and published sets: a rescan copies pointers, and an object of an unchanged
    /// file is recognised as unchanged by its pointer, so a change costs its files, not the
    /// directory's objects.
    objects: BTreeMap<ObjectKey, Arc<MeshObject>>,
    problems: Vec<DecodeError>,
}

impl FileState {
    fn decode(path: &Path, bytes: Vec<u8>, hash: u64, previous: Option<FileState>) -> FileState {
        let file = path.display().to_string();
        let (decoded, problems) = match String::from_utf8(bytes) {
            Ok(text) => decode_manifests(&file, &text),
            Err(_) => (
                Vec::new(),
                vec![path_problem(path, "file is not valid UTF-8".to_string())],
            ),
        };
        let mut objects = BTreeMap::new();
        for object in decoded {
            let key = object.key();
            if objects.insert(key.clone(), Arc::new(object)).is_some() {
                fsm_errcode::warn!(ErrCode::E3002, file, object = %key, "object defined twice in the same file; the later document wins");
            }
        }
        if !problems.is_empty()
            && let Some(previous) = previous
        {
            for (key, object) in previous.objects {
                if let Entry::Vacant(slot) = objects.entry(key) {
                    tracing::info!(file, object = %slot.key(), "file has problems; keeping the last good version of the object");
                    slot.insert(object);
                }
            }
        }
        FileState {
            hash: Some(hash),
            objects,
            problems,
        }
    }
}

/// Everything the watch task knows about the directory. Only ever touched by one thread at a time
/// (it moves into the blocking pool for each scan).
#[derive(Debug)]
struct State {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// What the catalog has been told.
    published: BTreeMap<ObjectKey, Arc<MeshObject>>,
    problems: Vec<DecodeError>,
    /// Every object with the files that define it, in path order (the last one wins): an edit
    /// then settles the objects of the files it touched, not the whole directory's.
    definers: BTreeMap<ObjectKey, Vec<Arc<Path>>>,
    /// Objects defined by more than one file, with those files in path order.
    duplicates: BTreeMap<ObjectKey, Vec<Arc<Path>>>,
    /// How many problems have been logged and counted so far.
    reported: usize,
    /// The last full scan found a directory it could not read: only full scans until one can.
    degraded: bool,
}

/// What the watcher reported since the last rescan: changed paths, or that everything must be
/// looked at again (lost events, a directory or symlink changed, a hidden entry such as a
/// ConfigMap volume's `..data` swapped).
#[derive(Debug, Default)]
struct Pending {
    paths: BTreeSet<PathBuf>,
    full: bool,
    /// Files changed and not closed by their writer since: still being written.
    writing: BTreeSet<PathBuf>,
}

impl Pending {
    /// Follows which files are being written. Only an event saying a write is complete (the
    /// writer closed the file, or it left by rename or removal) ends one; a kind of event this
    /// does not know (the polling watcher's) counts as a write in progress.
    fn note_writes(&mut self, event: &notify::Event) {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                for path in &event.paths {
                    self.writing.remove(path);
                }
            }
            // Complete as they happen: a directory made, a file renamed into place, metadata.
            EventKind::Create(CreateKind::Folder)
            | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Metadata(_))
            | EventKind::Access(_) => {}
            _ => self.writing.extend(event.paths.iter().cloned()),
        }
    }

    /// How long a burst of events must pause before the files are read.
    fn quiet(&self) -> Duration {
        if self.writing.is_empty() {
            SETTLED_QUIET
        } else {
            QUIET
        }
    }
}

impl State {
    fn load(root: PathBuf) -> Result<(State, Vec<CatalogEvent>), SourceError> {
        let mut state = State {
            root,
            files: BTreeMap::new(),
            published: BTreeMap::new(),
            problems: Vec::new(),
            definers: BTreeMap::new(),
            duplicates: BTreeMap::new(),
            reported: 0,
            degraded: false,
        };
        let unreadable = state.scan().map_err(|source| SourceError::Unreadable {
            path: state.root.clone(),
            source,
        })?;
        if let Some((path, source)) = unreadable.into_iter().next() {
            return Err(SourceError::Unreadable { path, source });
        }
        let effective = state.settle(&[]);
        let mut events = Vec::with_capacity(effective.len() + 3);
        events.push(CatalogEvent::Init(Scope::All));
        events.extend(
            effective
                .values()
                .map(|object| CatalogEvent::InitApply(MeshObject::clone(object))),
        );
        events.push(CatalogEvent::InitDone(Scope::All));
        events.push(CatalogEvent::Synced);
        state.published = effective;
        Ok((state, events))
    }

    /// Re-reads the directory and returns the events that bring the catalog up to date.
    fn rescan(&mut self) -> Vec<CatalogEvent> {
        let unreadable = match self.scan() {
            Ok(unreadable) => unreadable,
            Err(err) => {
                fsm_errcode::warn!(
                    ErrCode::E4150,
                    dir = %self.root.display(),
                    error = %err,
                    "cannot read manifest directory; keeping the last configuration"
                );
                return Vec::new();
            }
        };
        self.degraded = !unreadable.is_empty();
        let effective = self.settle(&unreadable);
        self.publish(effective)
    }

    /// Re-reads only `paths`, the files the watcher reported, when each is a plain manifest file
    /// (or a known one that is gone); anything else, or a degraded state, takes a full
    /// [`State::rescan`]. An edit of one file in a directory of thousands costs that file.
    fn rescan_paths(&mut self, paths: &BTreeSet<PathBuf>) -> Vec<CatalogEvent> {
        if self.degraded {
            return self.rescan();
        }
        let mut touched = BTreeSet::new();
        for path in paths {
            let Ok(relative) = path.strip_prefix(&self.root) else {
                return self.rescan();
            };
            let Some(leaf) = relative.file_name() else {
                return self.rescan();
            };
            // Inside a hidden directory (a ConfigMap volume's timestamped data, which visible
            // symlinks may point into): look at everything.
            if relative
                .parent()
                .is_some_and(|dir| dir.components().any(|c| is_ignored(c.as_os_str())))
            {
                return self.rescan();
            }
            let metadata = std::fs::symlink_metadata(path);
            if is_ignored(leaf) {
                // An editor's temporary or backup file (gone after its rename, or a plain file)
                // is no manifest; a hidden symlink or directory (a ConfigMap volume's `..data`
                // swapped) changes what visible names resolve to.
                match &metadata {
                    Ok(m) if m.is_file() => continue,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    _ => return self.rescan(),
                }
            }
            match metadata {
                Ok(metadata) if metadata.is_file() => {
                    if is_manifest(relative.as_os_str()) {
                        let before = self.files.remove(path);
                        let old_keys = defined_keys(before.as_ref());
                        self.read_file(path.clone(), before);
                        let new_keys = defined_keys(self.files.get(path));
                        self.redefine(path, &old_keys, &new_keys, &mut touched);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    // A removed manifest is forgotten; a removed directory takes a full rescan.
                    match self.files.remove(path) {
                        Some(before) => {
                            let old_keys = defined_keys(Some(&before));
                            self.redefine(path, &old_keys, &[], &mut touched);
                        }
                        None if self.files.keys().any(|known| known.starts_with(path)) => {
                            return self.rescan();
                        }
                        None => {}
                    }
                }
                // A directory, a symlink (its target may be anywhere) or an unreadable entry.
                _ => return self.rescan(),
            }
        }
        self.settle_problems(&[]);
        self.publish_touched(&touched)
    }

    /// Records that `path` now defines `new_keys` instead of `old_keys` (both sorted), and adds
    /// both to `touched`.
    fn redefine(
        &mut self,
        path: &Path,
        old_keys: &[ObjectKey],
        new_keys: &[ObjectKey],
        touched: &mut BTreeSet<ObjectKey>,
    ) {
        let shared: Arc<Path> = Arc::from(path);
        for key in old_keys {
            if new_keys.binary_search(key).is_err()
                && let Entry::Occupied(mut entry) = self.definers.entry(key.clone())
            {
                entry.get_mut().retain(|p| **p != *path);
                if entry.get().is_empty() {
                    entry.remove();
                }
            }
        }
        for key in new_keys {
            let paths = self.definers.entry(key.clone()).or_default();
            if let Err(at) = paths.binary_search_by(|p| (**p).cmp(path)) {
                paths.insert(at, shared.clone());
            }
        }
        touched.extend(old_keys.iter().cloned());
        touched.extend(new_keys.iter().cloned());
    }

    /// The events that bring the catalog up to date for the objects in `touched` (those of the
    /// files an edit changed); every other object is as it was published.
    fn publish_touched(&mut self, touched: &BTreeSet<ObjectKey>) -> Vec<CatalogEvent> {
        let mut events = Vec::new();
        let mut deleted = Vec::new();
        for key in touched {
            let paths = self.definers.get(key);
            note_duplicates(
                &mut self.duplicates,
                key,
                paths.filter(|paths| paths.len() > 1),
            );
            let winner = paths
                .and_then(|paths| paths.last())
                .and_then(|path| self.files.get(&**path))
                .and_then(|file| file.objects.get(key));
            match winner {
                Some(object) => {
                    let changed = self
                        .published
                        .get(key)
                        .is_none_or(|old| !Arc::ptr_eq(old, object) && old != object);
                    if changed {
                        events.push(CatalogEvent::Apply(MeshObject::clone(object)));
                        self.published.insert(key.clone(), object.clone());
                    }
                }
                None => {
                    if self.published.remove(key).is_some() {
                        deleted.push(key.clone());
                    }
                }
            }
        }
        // Reverse key order removes dependents (services, pods) before their namespace.
        events.extend(deleted.into_iter().rev().map(CatalogEvent::Delete));
        tracing::debug!(dir = %self.root.display(), changes = events.len(), "rescanned manifest files");
        events
    }

    /// The events that take the catalog from what it was told to `effective`.
    fn publish(&mut self, effective: BTreeMap<ObjectKey, Arc<MeshObject>>) -> Vec<CatalogEvent> {
        let mut events: Vec<CatalogEvent> = effective
            .iter()
            .filter(|(key, object)| {
                self.published
                    .get(*key)
                    .is_none_or(|old| !Arc::ptr_eq(old, object) && old != *object)
            })
            .map(|(_, object)| CatalogEvent::Apply(MeshObject::clone(object)))
            .collect();
        // Reverse key order removes dependents (services, pods) before their namespace.
        events.extend(
            self.published
                .keys()
                .rev()
                .filter(|key| !effective.contains_key(*key))
                .map(|key| CatalogEvent::Delete(key.clone())),
        );
        tracing::debug!(dir = %self.root.display(), changes = events.len(), "rescanned manifest directory");
        self.published = effective;
        events
    }

    /// Brings `files` up to date with the disk. Returns the directories below the root that could
    /// not be read (their files are kept as they were); fails only if the root cannot be read.
    fn scan(&mut self) -> io::Result<Vec<(PathBuf, io::Error)>> {
        let mut listed = Vec::new();
        let mut unreadable = Vec::new();
        walk(read_dir_sorted(&self.root)?, &mut listed, &mut unreadable);

        let mut previous = std::mem::take(&mut self.files);
        for path in listed {
            let before = previous.remove(&path);
            self.read_file(path, before);
        }
        // Files no longer listed are gone, unless they sit under a directory we could not list.
        for (path, before) in previous {
            if unreadable.iter().any(|(dir, _)| path.starts_with(dir)) {
                self.files.insert(path, before);
            }
        }
        Ok(unreadable)
    }

    /// Brings one listed file up to date from what was known of it (`before`): re-decoded if its
    /// content changed, forgotten if it is gone, kept with a problem if it cannot be read.
    fn read_file(&mut self, path: PathBuf, before: Option<FileState>) {
        let now = match std::fs::read(&path) {
            Ok(bytes) => {
                let hash = content_hash(&bytes);
                match before {
                    Some(before) if before.hash == Some(hash) => before,
                    before => FileState::decode(&path, bytes, hash, before),
                }
            }
            // Removed between listing and reading: treat it as removed.
            Err(err) if err.kind() == io::ErrorKind::NotFound => return,
            Err(err) => FileState {
                hash: None,
                objects: before.map(|before| before.objects).unwrap_or_default(),
                problems: vec![path_problem(&path, format!("cannot read file: {err}"))],
            },
        };
        self.files.insert(path, now);
    }

    /// Reports new problems and merges the files (later paths win) into the effective set.
    fn settle(
        &mut self,
        unreadable: &[(PathBuf, io::Error)],
    ) -> BTreeMap<ObjectKey, Arc<MeshObject>> {
        self.settle_problems(unreadable);
        let mut effective = BTreeMap::new();
        let mut definers: BTreeMap<ObjectKey, Vec<Arc<Path>>> = BTreeMap::new();
        for (path, file) in &self.files {
            let shared: Arc<Path> = Arc::from(path.as_path());
            for (key, object) in &file.objects {
                effective.insert(key.clone(), object.clone());
                definers
                    .entry(key.clone())
                    .or_default()
                    .push(shared.clone());
            }
        }
        self.duplicates.retain(|key, _| definers.contains_key(key));
        for (key, paths) in &definers {
            note_duplicates(
                &mut self.duplicates,
                key,
                (paths.len() > 1).then_some(paths),
            );
        }
        self.definers = definers;
        effective
    }

    /// Reports problems not reported before, and notes the ones resolved.
    fn settle_problems(&mut self, unreadable: &[(PathBuf, io::Error)]) {
        let mut problems: Vec<DecodeError> = unreadable
            .iter()
            .map(|(dir, err)| path_problem(dir, format!("cannot read directory: {err}")))
            .collect();
        problems.extend(
            self.files
                .values()
                .flat_map(|file| file.problems.iter().cloned()),
        );
        for problem in problems
            .iter()
            .filter(|problem| !self.problems.contains(problem))
        {
            report(problem);
            self.reported += 1;
        }
        for problem in self
            .problems
            .iter()
            .filter(|problem| !problems.contains(problem))
        {
            tracing::info!(
                file = problem.file.as_str(),
                document = problem.document,
                "manifest problem resolved: {problem}"
            );
        }
        self.problems = problems;
    }
}

fn report(problem: &DecodeError) {
    fsm_errcode::warn!(
        problem.err_code(),
        file = problem.file.as_str(),
        document = problem.document,
        line = problem.line,
        object = problem.object.as_deref().unwrap_or(""),
        field = problem.field.as_deref().unwrap_or(""),
        "ignoring invalid manifest; objects it defined before keep serving: {problem}"
    );
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<std::fs::DirEntry>> {
    let mut entries = std::fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

fn walk(
    entries: Vec<std::fs::DirEntry>,
    files: &mut Vec<PathBuf>,
    unreadable: &mut Vec<(PathBuf, io::Error)>,
) {
    for entry in entries {
        let name = entry.file_name();
        if is_ignored(&name) {
            continue;
        }
        let path = entry.path();
        // Fails only if the entry vanished since it was listed.
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            match read_dir_sorted(&path) {
                Ok(children) => walk(children, files, unreadable),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => unreadable.push((path, err)),
            }
        } else if is_manifest(&name)
            && (file_type.is_file() || (file_type.is_symlink() && path.is_file()))
        {
            files.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsm_catalog::Kind;
    use tokio::sync::mpsc::error::TryRecvError;
    use tokio::sync::mpsc::{Receiver, channel};

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n";
    const WAIT: Duration = Duration::from_secs(10);

    fn service(name: &str, port: u32) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: app\nspec:\n  ports:\n  - port: {port}\n"
        )
    }

    fn namespace_with_label(value: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n  labels:\n    from: {value}\n"
        )
    }

    fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn port_of(object: &MeshObject) -> i32 {
        let MeshObject::Service(svc) = object else {
            panic!("not a Service: {object:?}")
        };
        svc.spec
            .as_ref()
            .and_then(|spec| spec.ports.as_ref())
            .and_then(|ports| ports.first())
            .map(|p| p.port)
            .unwrap_or(-1)
    }

    fn label_of(object: &MeshObject) -> Option<String> {
        let MeshObject::Namespace(ns) = object else {
            panic!("not a Namespace: {object:?}")
        };
        ns.metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get("from").cloned())
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(path, text).expect("write manifest");
    }

    /// The platform's events, as the watcher reports them: a file is being written from its
    /// first write until its writer closes it, and only then does a burst wait the short quiet.
    #[tokio::test]
    async fn a_burst_waits_the_long_quiet_only_while_a_file_is_open_for_writing() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let pending = Arc::new(Mutex::new(Pending::default()));
        let _watcher = start_watcher(
            dir.path(),
            Arc::new(Notify::new()),
            pending.clone(),
            Backend::EventDriven,
        )
        .expect("watcher");
        let path = dir.path().join("a.yaml");
        let until = async |what: &str, done: &dyn Fn(&Pending) -> bool| {
            let deadline = Instant::now() + WAIT;
            while !done(&pending.lock()) {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let mut file = std::fs::File::create(&path).expect("create");
        file.write_all(NAMESPACE.as_bytes()).expect("write");
        file.flush().expect("flush");
        until("the write", &|p| p.paths.contains(&path)).await;
        assert_eq!(pending.lock().quiet(), QUIET, "{:?}", pending.lock());
        drop(file);
        until("the close", &|p| p.writing.is_empty()).await;
        assert_eq!(pending.lock().quiet(), SETTLED_QUIET);

        // Written and closed at once, as editors, `cp` and `kubectl` do.
        *pending.lock() = Pending::default();
        let other = dir.path().join("b.yaml");
        std::fs::write(&other, NAMESPACE).expect("write");
        until("the write", &|p| p.paths.contains(&other)).await;
        until("the close", &|p| p.writing.is_empty()).await;
        // A rename into place and a removal are complete as they happen.
        std::fs::rename(&other, dir.path().join("c.yaml")).expect("rename");
        std::fs::remove_file(&path).expect("remove");
        until("the removal", &|p| p.paths.contains(&path)).await;
        assert_eq!(
            pending.lock().quiet(),
            SETTLED_QUIET,
            "{:?}",
            pending.lock()
        );
    }

    /// Events of a kind not known to end a write (the polling watcher's) keep the long quiet.
    #[test]
    fn an_unknown_change_counts_as_a_write_in_progress() {
        let mut pending = Pending::default();
        let path = PathBuf::from("/m/a.yaml");
        pending.note_writes(&notify::Event::new(EventKind::Any).add_path(path.clone()));
        assert_eq!(pending.quiet(), QUIET);
        pending.note_writes(
            &notify::Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)))
                .add_path(path),
        );
        assert_eq!(pending.quiet(), SETTLED_QUIET);
    }

    struct Harness {
        dir: tempfile::TempDir,
        source: ManifestSource,
        events: Receiver<CatalogEvent>,
    }

    impl Harness {
        /// Starts a source over `files` and returns it with the objects of its initial list.
        async fn start(files: &[(&str, &str)]) -> (Harness, Vec<MeshObject>) {
            let dir = tempfile::tempdir().expect("tempdir");
            for (name, text) in files {
                write(dir.path(), name, text);
            }
            let (tx, mut events) = channel(crate::EVENT_QUEUE);
            let source = ManifestSource::spawn(dir.path().to_path_buf(), tx)
                .await
                .expect("spawn");
            let mut next = async || {
                tokio::time::timeout(WAIT, events.recv())
                    .await
                    .expect("the initial list follows spawn")
                    .expect("channel open")
            };
            assert_eq!(next().await, CatalogEvent::Init(Scope::All));
            let mut listed = Vec::new();
            loop {
                match next().await {
                    CatalogEvent::InitApply(object) => listed.push(object),
                    CatalogEvent::InitDone(Scope::All) => break,
                    other => panic!("unexpected event in the initial list: {other:?}"),
                }
            }
            assert_eq!(
                next().await,
                CatalogEvent::Synced,
                "the initial list is followed by Synced"
            );
            (
                Harness {
                    dir,
                    source,
                    events,
                },
                listed,
            )
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        async fn next(&mut self) -> CatalogEvent {
            tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("timed out waiting for an event")
                .expect("channel closed")
        }

        /// A rescan sends its whole batch at once, so once its first event has arrived anything
        /// else it produced is already queued.
        fn assert_idle(&mut self) {
            match self.events.try_recv() {
                Err(TryRecvError::Empty) => {}
                other => panic!("unexpected extra event: {other:?}"),
            }
        }

        async fn wait_for_problems(
            &self,
            want: impl Fn(&[DecodeError]) -> bool,
        ) -> Vec<DecodeError> {
            let deadline = Instant::now() + WAIT;
            loop {
                let problems = self.source.problems();
                if want(&problems) {
                    return problems;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for problems; have {problems:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn initial_load_lists_every_manifest_and_skips_the_rest() {
        let (h, listed) = Harness::start(&[
            ("a.yaml", NAMESPACE),
            ("sub/b.yml", &service("s", 80)),
            (".#a.yaml", &service("hidden", 80)),
            ("a.yaml~", &service("backup", 80)),
            (".a.yaml.swp", &service("swap", 80)),
            (".git/c.yaml", &service("git", 80)),
            ("notes.txt", &service("text", 80)),
        ])
        .await;
        let keys: Vec<ObjectKey> = listed.iter().map(MeshObject::key).collect();
        assert_eq!(
            keys,
            vec![
                key(Kind::Namespace, "", "app"),
                key(Kind::Service, "app", "s")
            ]
        );
        assert!(h.source.problems().is_empty());
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let (tx, _rx) = channel(crate::EVENT_QUEUE);
        let err = ManifestSource::spawn(missing.clone(), tx)
            .await
            .expect_err("must fail");
        assert!(
            matches!(err, SourceError::Unreadable { ref path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let file = dir.path().join("file.yaml");
        write(dir.path(), "file.yaml", NAMESPACE);
        let (tx, _rx) = channel(crate::EVENT_QUEUE);
        let err = ManifestSource::spawn(file, tx)
            .await
            .expect_err("must fail");
        assert!(matches!(err, SourceError::NotADirectory { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn editing_a_file_applies_only_the_changed_object() {
        let text = format!(
            "{NAMESPACE}---\n{}---\n{}",
            service("s", 80),
            service("t", 80)
        );
        let (mut h, listed) = Harness::start(&[("app.yaml", &text)]).await;
        assert_eq!(listed.len(), 3);

        let text = format!(
            "{NAMESPACE}---\n{}---\n{}",
            service("s", 8080),
            service("t", 80)
        );
        write(h.path(), "app.yaml", &text);
        match h.next().await {
            CatalogEvent::Apply(object) => {
                assert_eq!(object.key(), key(Kind::Service, "app", "s"));
                assert_eq!(port_of(&object), 8080);
            }
            other => panic!("expected Apply, got {other:?}"),
        }
        h.assert_idle();
    }

    #[tokio::test]
    async fn removing_a_document_deletes_its_object() {
        let text = format!("{NAMESPACE}---\n{}", service("s", 80));
        let (mut h, _) = Harness::start(&[("app.yaml", &text)]).await;

        write(h.path(), "app.yaml", NAMESPACE);
        assert_eq!(
            h.next().await,
            CatalogEvent::Delete(key(Kind::Service, "app", "s"))
        );
        h.assert_idle();
    }

    #[tokio::test]
    async fn deleting_a_file_deletes_its_objects() {
        let (mut h, _) =
            Harness::start(&[("ns.yaml", NAMESPACE), ("svc.yaml", &service("s", 80))]).await;

        std::fs::remove_file(h.path().join("svc.yaml")).expect("remove");
        assert_eq!(
            h.next().await,
            CatalogEvent::Delete(key(Kind::Service, "app", "s"))
        );
        h.assert_idle();
    }

    #[tokio::test]
    async fn new_files_are_applied_including_renamed_and_nested_ones() {
        let (mut h, _) = Harness::start(&[("ns.yaml", NAMESPACE)]).await;

        write(h.path(), "svc.yaml", &service("s", 80));
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(object.key(), key(Kind::Service, "app", "s")),
            other => panic!("expected Apply, got {other:?}"),
        }
        h.assert_idle();

        // Editors and `kubectl`-style tools write a hidden temporary file and rename it in place.
        write(h.path(), ".svc2.yaml.tmp", &service("t", 80));
        std::fs::rename(h.path().join(".svc2.yaml.tmp"), h.path().join("svc2.yaml"))
            .expect("rename");
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(object.key(), key(Kind::Service, "app", "t")),
            other => panic!("expected Apply, got {other:?}"),
        }
        h.assert_idle();

        write(h.path(), "deeper/still/svc3.yaml", &service("u", 80));
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(object.key(), key(Kind::Service, "app", "u")),
            other => panic!("expected Apply, got {other:?}"),
        }
        h.assert_idle();
    }

    #[tokio::test]
    async fn a_malformed_document_is_reported_and_the_others_load() {
        let text = format!("{NAMESPACE}---\nkind: [unclosed\n---\n{}", service("s", 80));
        let (h, listed) = Harness::start(&[("app.yaml", &text)]).await;
        let keys: Vec<ObjectKey> = listed.iter().map(MeshObject::key).collect();
        assert_eq!(
            keys,
            vec![
                key(Kind::Namespace, "", "app"),
                key(Kind::Service, "app", "s")
            ]
        );
        let problems = h.source.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].file.ends_with("app.yaml"), "{}", problems[0]);
        assert_eq!(problems[0].document, 1);
        assert!(
            problems[0].message.contains("malformed YAML"),
            "{}",
            problems[0]
        );
    }

    #[tokio::test]
    async fn a_document_turned_malformed_keeps_its_object_until_fixed() {
        let good = format!("{NAMESPACE}---\n{}", service("s", 80));
        let (mut h, _) = Harness::start(&[("app.yaml", &good)]).await;

        let broken = format!("{NAMESPACE}---\napiVersion: v1\nkind: Service\nmetadata: [oops\n");
        write(h.path(), "app.yaml", &broken);
        let problems = h.wait_for_problems(|p| !p.is_empty()).await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].document, 1);
        h.assert_idle();

        write(
            h.path(),
            "app.yaml",
            &format!("{NAMESPACE}---\n{}", service("s", 81)),
        );
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(port_of(&object), 81),
            other => panic!("expected Apply, got {other:?}"),
        }
        h.assert_idle();
        h.wait_for_problems(<[DecodeError]>::is_empty).await;
    }

    #[tokio::test]
    async fn kept_objects_go_once_the_file_is_clean_without_them() {
        let good = format!("{NAMESPACE}---\n{}", service("s", 80));
        let (mut h, _) = Harness::start(&[("app.yaml", &good)]).await;

        write(
            h.path(),
            "app.yaml",
            &format!("{NAMESPACE}---\nkind: [unclosed\n"),
        );
        h.wait_for_problems(|p| !p.is_empty()).await;
        h.assert_idle();

        write(h.path(), "app.yaml", NAMESPACE);
        assert_eq!(
            h.next().await,
            CatalogEvent::Delete(key(Kind::Service, "app", "s"))
        );
        h.assert_idle();
        h.wait_for_problems(<[DecodeError]>::is_empty).await;
    }

    #[tokio::test]
    async fn a_duplicate_falls_back_to_the_remaining_definition() {
        let (mut h, listed) = Harness::start(&[
            ("a.yaml", &namespace_with_label("a")),
            ("b.yaml", &namespace_with_label("b")),
        ])
        .await;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            label_of(&listed[0]).as_deref(),
            Some("b"),
            "the later file wins"
        );

        write(h.path(), "b.yaml", "");
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(label_of(&object).as_deref(), Some("a")),
            other => panic!("expected Apply, got {other:?}"),
        }
        h.assert_idle();

        std::fs::remove_file(h.path().join("a.yaml")).expect("remove");
        assert_eq!(
            h.next().await,
            CatalogEvent::Delete(key(Kind::Namespace, "", "app"))
        );
        h.assert_idle();
    }

    #[tokio::test]
    async fn a_consumer_that_falls_behind_holds_the_source_back_and_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let services: String = (0..20)
            .map(|i| format!("---\n{}", service(&format!("s{i}"), 80)))
            .collect();
        write(dir.path(), "all.yaml", &format!("{NAMESPACE}{services}"));
        let (tx, mut events) = channel(2);
        let _source = ManifestSource::spawn(dir.path().to_path_buf(), tx)
            .await
            .expect("spawn");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            events.len(),
            2,
            "the channel's capacity, not the whole list"
        );
        let mut received = Vec::new();
        while received.last() != Some(&CatalogEvent::Synced) {
            let event = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("the rest follows as the consumer reads")
                .expect("channel open");
            received.push(event);
        }
        assert_eq!(
            received.len(),
            1 + 21 + 2,
            "Init, 21 objects, InitDone, Synced"
        );
    }

    #[tokio::test]
    async fn the_poll_fallback_sees_changes_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "ns.yaml", NAMESPACE);
        let (tx, mut events) = channel(crate::EVENT_QUEUE);
        let _source = ManifestSource::spawn_with(dir.path().to_path_buf(), tx, Backend::Poll)
            .await
            .expect("spawn");
        let mut initial = Vec::new();
        while initial.last() != Some(&CatalogEvent::Synced) {
            let event = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("the initial list follows spawn")
                .expect("channel open");
            initial.push(event);
        }
        assert_eq!(
            initial.len(),
            4,
            "Init, one object, InitDone, Synced: {initial:?}"
        );

        write(dir.path(), "svc.yaml", &service("s", 80));
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("timed out waiting for an event")
            .expect("channel closed");
        let CatalogEvent::Apply(object) = event else {
            panic!("expected Apply, got {event:?}")
        };
        assert_eq!(object.key(), key(Kind::Service, "app", "s"));
    }

    #[test]
    fn unchanged_problems_are_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = format!("{NAMESPACE}---\n{}", service("s", 70000));
        write(dir.path(), "bad.yaml", &bad);
        let (mut state, _) = State::load(dir.path().to_path_buf()).expect("load");
        assert_eq!(state.reported, 1);

        assert!(state.rescan().is_empty());
        write(dir.path(), "other.yaml", "# nothing yet\n");
        assert!(state.rescan().is_empty());
        // New content, same problem.
        write(
            dir.path(),
            "bad.yaml",
            &format!("{bad}# trailing comment\n"),
        );
        assert!(state.rescan().is_empty());
        assert_eq!(state.reported, 1);
        assert_eq!(state.problems.len(), 1);

        write(dir.path(), "other.yaml", &service("t", 0));
        assert!(state.rescan().is_empty());
        assert_eq!(state.reported, 2);
    }

    /// What the catalog is told, as `Apply kind/ns/name port` and `Delete kind/ns/name` lines.
    fn described(events: &[CatalogEvent]) -> Vec<String> {
        events
            .iter()
            .map(|event| match event {
                CatalogEvent::Apply(object) => {
                    format!("Apply {} {}", object.key(), port_of(object))
                }
                CatalogEvent::Delete(key) => format!("Delete {key}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn reported_paths_are_reread_alone_and_anything_unusual_rescans_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "ns.yaml", NAMESPACE);
        write(dir.path(), "a.yaml", &service("a", 80));
        write(dir.path(), "b.yaml", &service("b", 80));
        let (mut state, _) = State::load(dir.path().to_path_buf()).expect("load");
        let paths = |names: &[&str]| -> std::collections::BTreeSet<PathBuf> {
            names.iter().map(|n| dir.path().join(n)).collect()
        };

        // Both files change, the watcher reported one: only it is read.
        write(dir.path(), "a.yaml", &service("a", 81));
        write(dir.path(), "b.yaml", &service("b", 81));
        assert_eq!(
            described(&state.rescan_paths(&paths(&["a.yaml"]))),
            ["Apply Service app/a 81"]
        );
        // An editor's temporary file, gone after its rename: nothing to read.
        assert!(state.rescan_paths(&paths(&[".a.yaml.tmp"])).is_empty());
        // A removed file is forgotten.
        std::fs::remove_file(dir.path().join("a.yaml")).expect("remove");
        assert_eq!(
            described(&state.rescan_paths(&paths(&["a.yaml"]))),
            ["Delete Service app/a"]
        );
        // A hidden symlink (a ConfigMap volume's `..data` swapped) rescans everything, which
        // finds the change to b the watcher never reported.
        std::os::unix::fs::symlink(dir.path().join("b.yaml"), dir.path().join("..data"))
            .expect("symlink");
        assert_eq!(
            described(&state.rescan_paths(&paths(&["..data"]))),
            ["Apply Service app/b 81"]
        );
        // So does a new directory.
        write(dir.path(), "sub/c.yaml", &service("c", 80));
        assert_eq!(
            described(&state.rescan_paths(&paths(&["sub"]))),
            ["Apply Service app/c 80"]
        );
    }

    /// What the catalog holds after `events`, from `held`.
    fn replay(held: &mut BTreeMap<ObjectKey, MeshObject>, events: Vec<CatalogEvent>) {
        for event in events {
            match event {
                CatalogEvent::Apply(object) | CatalogEvent::InitApply(object) => {
                    held.insert(object.key(), object);
                }
                CatalogEvent::Delete(key) => {
                    held.remove(&key);
                }
                _ => {}
            }
        }
    }

    /// One write of a file: the services it defines (by index, with a port), whether a
    /// malformed document comes with them, or removal.
    #[derive(Clone, Debug)]
    enum FileEdit {
        Write {
            services: Vec<(u8, u16)>,
            malformed: bool,
        },
        Remove,
    }

    fn file_edit() -> impl proptest::strategy::Strategy<Value = FileEdit> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (proptest::collection::vec((0u8..5, 1u16..4), 0..4), proptest::bool::weighted(0.2))
                .prop_map(|(services, malformed)| FileEdit::Write { services, malformed }),
            1 => Just(FileEdit::Remove),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Re-reading only the edited file tells the catalog exactly what re-reading the whole
        /// directory does, whatever the files define (the same object in several files, objects
        /// kept while a file is malformed, files removed and written again).
        #[test]
        fn rereading_one_file_settles_as_a_full_rescan(
            edits in proptest::collection::vec((0usize..4, file_edit()), 1..12)
        ) {
            const FILES: [&str; 4] = ["a.yaml", "b.yaml", "sub/c.yaml", "z.yaml"];
            let dir = tempfile::tempdir().expect("tempdir");
            write(dir.path(), "0-ns.yaml", NAMESPACE);
            write(dir.path(), "sub/keep.yaml", &service("kept", 1));
            let (mut one_file, initial) = State::load(dir.path().to_path_buf()).expect("load");
            let (mut full, _) = State::load(dir.path().to_path_buf()).expect("load");
            let mut held = BTreeMap::new();
            replay(&mut held, initial);
            for (file, edit) in edits {
                let path = dir.path().join(FILES[file]);
                match edit {
                    FileEdit::Write { services, malformed } => {
                        let mut docs: Vec<String> = services
                            .iter()
                            .map(|(s, port)| service(&format!("s{s}"), u32::from(*port)))
                            .collect();
                        if malformed {
                            docs.push(service("broken", 70000));
                        }
                        write(dir.path(), FILES[file], &docs.join("---\n"));
                    }
                    FileEdit::Remove => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                replay(&mut held, one_file.rescan_paths(&BTreeSet::from([path])));
                let _ = full.rescan();
                let expected: BTreeMap<ObjectKey, MeshObject> = full
                    .published
                    .iter()
                    .map(|(k, o)| (k.clone(), MeshObject::clone(o)))
                    .collect();
                proptest::prop_assert_eq!(&held, &expected);
                proptest::prop_assert_eq!(&one_file.duplicates, &full.duplicates);
                proptest::prop_assert_eq!(&one_file.definers, &full.definers);
                proptest::prop_assert_eq!(&one_file.problems, &full.problems);
            }
        }
    }

    #[tokio::test]
    async fn a_configmap_volume_swap_is_seen() {
        // The layout kubelet gives a ConfigMap volume: visible symlinks into `..data`, itself a
        // symlink to a hidden timestamped directory, swapped atomically on update.
        let (mut h, listed) = Harness::start(&[("ns.yaml", NAMESPACE)]).await;
        assert_eq!(listed.len(), 1);
        let root = h.path().to_path_buf();
        let volume = |stamp: &str, port: u32| {
            write(&root, &format!("..{stamp}/svc.yaml"), &service("s", port));
            let tmp = root.join("..data_tmp");
            std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("symlink");
            std::fs::rename(&tmp, root.join("..data")).expect("swap ..data");
        };
        volume("2026_12_07_01", 80);
        std::os::unix::fs::symlink("..data/svc.yaml", root.join("svc.yaml")).expect("symlink");
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(port_of(&object), 80),
            other => panic!("expected Apply, got {other:?}"),
        }
        volume("2026_12_07_02", 8080);
        match h.next().await {
            CatalogEvent::Apply(object) => assert_eq!(port_of(&object), 8080),
            other => panic!("expected Apply, got {other:?}"),
        }
    }
}
