//! The resume token of the MongoDB source, durably on disk: after a crash or restart the
//! change stream resumes after what the engine was last handed.

use std::path::{Path, PathBuf};

use bson::Document;
use mongodb::change_stream::event::ResumeToken;

use super::MongoError;

/// The resume token, durably on disk.
pub struct Checkpoint {
    path: PathBuf,
}

impl Checkpoint {
    /// The checkpoint at `path` (which need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Checkpoint { path: path.into() }
    }

    /// The token saved last, if any.
    pub fn load(&self) -> Result<Option<ResumeToken>, MongoError> {
        let failed = |source| MongoError::Checkpoint { path: self.path.display().to_string(), source };
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let token = Document::from_reader(&bytes[..])
                    .ok()
                    .and_then(|doc| bson::deserialize_from_document::<ResumeToken>(doc).ok())
                    .ok_or_else(|| {
                        failed(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a resume token"))
                    })?;
                Ok(Some(token))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    /// Saves `token` durably: written aside, synced, renamed over the old one, directory synced.
    pub fn save(&self, token: &ResumeToken) -> Result<(), MongoError> {
        let failed = |source| MongoError::Checkpoint { path: self.path.display().to_string(), source };
        let doc = bson::serialize_to_document(token)
            .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut bytes = Vec::new();
        doc.to_writer(&mut bytes).map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let aside = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&aside).map_err(failed)?;
            file.write_all(&bytes).map_err(failed)?;
            file.sync_all().map_err(failed)?;
        }
        std::fs::rename(&aside, &self.path).map_err(failed)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
        }
        Ok(())
    }
}

/// Where the resume token of a data directory lives.
pub fn checkpoint_path(data: &Path) -> PathBuf {
    data.join("mongodb-resume-token.bson")
}
