// Package todo is a small to-do list API whose items live in Postgres.
package todo

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
)

// ErrNotFound is returned for an item id that does not exist.
var ErrNotFound = errors.New("todo: no such item")

// ErrEmptyTitle is returned when an item would have no title.
var ErrEmptyTitle = errors.New("todo: title must not be empty")

const schema = `
CREATE TABLE IF NOT EXISTS todos (
	id bigserial PRIMARY KEY,
	title text NOT NULL CHECK (title <> ''),
	done boolean NOT NULL DEFAULT false
)`

// Item is one entry of the list.
type Item struct {
	ID    int64  `json:"id"`
	Title string `json:"title"`
	Done  bool   `json:"done"`
}

// Store keeps items in a Postgres database.
type Store struct {
	db *sql.DB
}

// NewStore creates the table if needed and returns a store over db.
func NewStore(ctx context.Context, db *sql.DB) (*Store, error) {
	if _, err := db.ExecContext(ctx, schema); err != nil {
		return nil, fmt.Errorf("todo: create schema: %w", err)
	}
	return &Store{db: db}, nil
}

// Add stores a new, not yet done item.
func (s *Store) Add(ctx context.Context, title string) (Item, error) {
	title = strings.TrimSpace(title)
	if title == "" {
		return Item{}, ErrEmptyTitle
	}
	item := Item{Title: title}
	err := s.db.QueryRowContext(ctx,
		"INSERT INTO todos (title) VALUES ($1) RETURNING id", title).Scan(&item.ID)
	if err != nil {
		return Item{}, fmt.Errorf("todo: add %q: %w", title, err)
	}
	return item, nil
}

// List returns every item, oldest first.
func (s *Store) List(ctx context.Context) ([]Item, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT id, title, done FROM todos ORDER BY id")
	if err != nil {
		return nil, fmt.Errorf("todo: list: %w", err)
	}
	defer rows.Close()
	items := []Item{}
	for rows.Next() {
		var item Item
		if err := rows.Scan(&item.ID, &item.Title, &item.Done); err != nil {
			return nil, fmt.Errorf("todo: list: %w", err)
		}
		items = append(items, item)
	}
	return items, rows.Err()
}

// Complete marks an item done.
func (s *Store) Complete(ctx context.Context, id int64) (Item, error) {
	item := Item{ID: id, Done: true}
	err := s.db.QueryRowContext(ctx,
		"UPDATE todos SET done = true WHERE id = $1 RETURNING title", id).Scan(&item.Title)
	if errors.Is(err, sql.ErrNoRows) {
		return Item{}, ErrNotFound
	}
	if err != nil {
		return Item{}, fmt.Errorf("todo: complete %d: %w", id, err)
	}
	return item, nil
}
