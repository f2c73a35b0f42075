'use strict';
// Visit counting: every visit is a row in Postgres; each page's total is cached in Redis.

const SCHEMA = `
  CREATE TABLE IF NOT EXISTS visits (
    id bigserial PRIMARY KEY,
    page text NOT NULL,
    visited_at timestamptz NOT NULL DEFAULT now()
  )`;

const CACHE_SECONDS = 60;

function cacheKey(page) {
  return `visits:${page}`;
}

async function migrate(pool) {
  await pool.query(SCHEMA);
}

async function countVisits(pool, redis, page) {
  const cached = await redis.get(cacheKey(page));
  if (cached !== null) {
    return Number(cached);
  }
  const { rows } = await pool.query(
    'SELECT count(*)::int AS total FROM visits WHERE page = $1',
    [page],
  );
  await redis.set(cacheKey(page), String(rows[0].total), { EX: CACHE_SECONDS });
  return rows[0].total;
}

async function recordVisit(pool, redis, page) {
  await pool.query('INSERT INTO visits (page) VALUES ($1)', [page]);
  // Dropping the cached total (rather than incrementing it) means the cache can never drift
  // from the table, even when another process inserted rows meanwhile.
  await redis.del(cacheKey(page));
  return countVisits(pool, redis, page);
}

module.exports = { cacheKey, countVisits, migrate, recordVisit };
