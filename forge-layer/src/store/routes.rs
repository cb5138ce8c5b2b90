//! The routing table's persistence: the table in force and the history of every change.

use forge_router::RouteSpec;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{ROUTE_HISTORY, ROUTES, Store, StoreError, db_err};

/// One accepted change of the routing table, with the whole table after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteChange {
    /// The table version this change produced.
    pub version: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// Who made it: `config`, `admin`, `guard`, `distiller`.
    pub actor: String,
    /// What was done, e.g. `set_canary 12.5% ft:…`.
    pub action: String,
    /// The alias it concerned, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Every route after the change.
    pub routes: Vec<RouteSpec>,
}

const CURRENT: &str = "current";

impl Store {
    /// Records a change: the new table in force and a history entry, in one transaction.
    pub fn save_routes(&self, change: &RouteChange) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(change)?;
        self.write(|txn| {
            txn.open_table(ROUTES)
                .map_err(db_err)?
                .insert(CURRENT, bytes.as_slice())
                .map_err(db_err)?;
            txn.open_table(ROUTE_HISTORY)
                .map_err(db_err)?
                .insert(change.version, bytes.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    /// The table in force when the store was last written, if any.
    pub fn load_routes(&self) -> Result<Option<RouteChange>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(ROUTES).map_err(db_err)?;
            match table.get(CURRENT).map_err(db_err)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
                None => Ok(None),
            }
        })
    }

    /// The latest `limit` changes, newest first.
    pub fn route_history(&self, limit: usize) -> Result<Vec<RouteChange>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(ROUTE_HISTORY).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)?.rev().take(limit) {
                let (_, v) = entry.map_err(db_err)?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
    }
}
