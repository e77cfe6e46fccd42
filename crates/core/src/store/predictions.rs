//! Rows of the `prediction_cache` table: predictions by cache key (see
//! [`crate::prediction_key`]), shared by every ML backend process on one database.

use std::collections::HashMap;

use sqlx::Row;

use super::{now, Store, StoreError};

/// One cached prediction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedPrediction {
    /// The cache key.
    pub key: String,
    /// The version that made it.
    pub model_version: String,
    /// `{"result": [...], "score": ...}` as JSON text.
    pub prediction: String,
}

impl Store {
    /// The cached predictions among `keys`, by key.
    pub async fn cached_predictions(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, CachedPrediction>, StoreError> {
        let mut found = HashMap::new();
        // Bounded statements: SQLite allows 32,766 parameters, PostgreSQL 65,535.
        for chunk in keys.chunks(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT cache_key, model_version, prediction FROM prediction_cache WHERE cache_key IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(key);
            }
            for row in query.fetch_all(&self.pool).await? {
                let p = CachedPrediction {
                    key: row.try_get("cache_key")?,
                    model_version: row.try_get("model_version")?,
                    prediction: row.try_get("prediction")?,
                };
                found.insert(p.key.clone(), p);
            }
        }
        Ok(found)
    }

    /// Stores predictions, replacing any under the same key.
    pub async fn cache_predictions(&self, rows: &[CachedPrediction]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for p in rows {
            sqlx::query(
                "INSERT INTO prediction_cache (cache_key, model_version, prediction, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (cache_key) DO UPDATE SET model_version = excluded.model_version, \
                 prediction = excluded.prediction, created_at = excluded.created_at",
            )
            .bind(&p.key)
            .bind(&p.model_version)
            .bind(&p.prediction)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
