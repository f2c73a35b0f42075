'use strict';
// The visit counter against the real Postgres and Redis that preboot started.

const assert = require('node:assert/strict');
const { after, before, beforeEach, describe, it } = require('node:test');
const { Pool } = require('pg');
const { createClient } = require('redis');
const { createServer } = require('../src/server');
const { cacheKey, countVisits, migrate, recordVisit } = require('../src/visits');

const databaseUrl = process.env.TEST_DATABASE_URL;
const redisUrl = process.env.TEST_REDIS_URL;

describe('visit counter', () => {
  let pool;
  let redis;

  before(async () => {
    assert.ok(databaseUrl && redisUrl, 'TEST_DATABASE_URL and TEST_REDIS_URL must be set');
    pool = new Pool({ connectionString: databaseUrl });
    redis = createClient({ url: redisUrl });
    await redis.connect();
    await migrate(pool);
  });

  beforeEach(async () => {
    await pool.query('TRUNCATE visits');
    await redis.flushDb();
  });

  after(async () => {
    await redis.quit();
    await pool.end();
  });

  it('stores each visit as a row in Postgres', async () => {
    await recordVisit(pool, redis, 'home');
    await recordVisit(pool, redis, 'about');

    const { rows } = await pool.query('SELECT page FROM visits ORDER BY id');
    assert.deepEqual(rows.map((row) => row.page), ['home', 'about']);
  });

  it('caches the total in Redis with an expiry', async () => {
    assert.equal(await countVisits(pool, redis, 'home'), 0);
    await pool.query("INSERT INTO visits (page) VALUES ('home')");

    // The row inserted behind the cache's back is not seen until the cache is dropped.
    assert.equal(await countVisits(pool, redis, 'home'), 0);
    assert.ok((await redis.ttl(cacheKey('home'))) > 0);
  });

  it('drops the cached total when a visit is recorded', async () => {
    assert.equal(await recordVisit(pool, redis, 'home'), 1);
    assert.equal(await recordVisit(pool, redis, 'home'), 2);
    assert.equal(await redis.get(cacheKey('home')), '2');
  });

  it('serves totals over HTTP', async () => {
    const server = createServer(pool, redis).listen(0);
    await new Promise((resolve) => server.once('listening', resolve));
    const base = `http://localhost:${server.address().port}`;
    try {
      await fetch(`${base}/visits/docs`, { method: 'POST' });
      const posted = await fetch(`${base}/visits/docs`, { method: 'POST' });
      assert.equal(posted.status, 201);
      assert.deepEqual(await posted.json(), { page: 'docs', visits: 2 });

      const missing = await fetch(`${base}/nowhere`);
      assert.equal(missing.status, 404);
    } finally {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  });
});
