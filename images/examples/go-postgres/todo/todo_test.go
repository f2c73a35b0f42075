package todo_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	_ "github.com/lib/pq"

	"example.com/todo/todo"
)

// openStore connects to the test database that the image created and preboot started, with an
// empty table.
func openStore(t *testing.T) (*todo.Store, *sql.DB) {
	t.Helper()
	url := os.Getenv("TEST_DATABASE_URL")
	if url == "" {
		t.Fatal("TEST_DATABASE_URL is not set; run the tests in the example's image")
	}
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ctx := context.Background()
	store, err := todo.NewStore(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "TRUNCATE todos RESTART IDENTITY"); err != nil {
		t.Fatal(err)
	}
	return store, db
}

func TestAddedItemsAreRowsInPostgres(t *testing.T) {
	store, db := openStore(t)
	ctx := context.Background()

	if _, err := store.Add(ctx, "  write the README "); err != nil {
		t.Fatal(err)
	}
	var title string
	var done bool
	if err := db.QueryRowContext(ctx, "SELECT title, done FROM todos").Scan(&title, &done); err != nil {
		t.Fatal(err)
	}
	if title != "write the README" || done {
		t.Fatalf("row = (%q, %v), want (\"write the README\", false)", title, done)
	}
}

func TestEmptyTitleIsRefused(t *testing.T) {
	store, _ := openStore(t)

	_, err := store.Add(context.Background(), "   ")

	if !errors.Is(err, todo.ErrEmptyTitle) {
		t.Fatalf("err = %v, want ErrEmptyTitle", err)
	}
}

func TestCompletingAnUnknownItemIsNotFound(t *testing.T) {
	store, _ := openStore(t)

	_, err := store.Complete(context.Background(), 42)

	if !errors.Is(err, todo.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
}

func TestHTTPAddCompleteList(t *testing.T) {
	store, _ := openStore(t)
	server := httptest.NewServer(todo.Handler(store))
	defer server.Close()

	post := func(path, body string) *http.Response {
		t.Helper()
		response, err := http.Post(server.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		return response
	}
	added := post("/todos", `{"title": "ship it"}`)
	added.Body.Close()
	if added.StatusCode != http.StatusCreated {
		t.Fatalf("POST /todos: status %d, want 201", added.StatusCode)
	}
	completed := post("/todos/1/done", "")
	completed.Body.Close()
	if completed.StatusCode != http.StatusOK {
		t.Fatalf("POST /todos/1/done: status %d, want 200", completed.StatusCode)
	}

	response, err := http.Get(server.URL + "/todos")
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	var items []todo.Item
	if err := json.NewDecoder(response.Body).Decode(&items); err != nil {
		t.Fatal(err)
	}
	if len(items) != 1 || items[0] != (todo.Item{ID: 1, Title: "ship it", Done: true}) {
		t.Fatalf("GET /todos = %+v, want one done item \"ship it\"", items)
	}
}
